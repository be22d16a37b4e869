"""Synthetic CT generators and their DICOM / ground-truth writers (small volumes, real pydicom and dciodvfy)."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
)

from training.synthetic import (
    LEVELS,
    generate_chest_ct,
    generate_spine_ct,
    write_chest_ct_study,
    write_ct_series,
    write_spine_ct_study,
)

ROWS = 96


@pytest.fixture(scope="module")
def chest():  # noqa: ANN201
    return generate_chest_ct(7, slices=60, nodules=4, rows=ROWS)


@pytest.fixture(scope="module")
def spine():  # noqa: ANN201
    return generate_spine_ct(11, rows=ROWS)


def test_chest_is_deterministic_and_seed_dependent(chest) -> None:  # noqa: ANN001
    again = generate_chest_ct(7, slices=60, nodules=4, rows=ROWS)
    assert np.array_equal(chest.hu, again.hu) and np.array_equal(chest.label_map, again.label_map)
    assert chest.nodules == again.nodules and chest.spacing == again.spacing
    other = generate_chest_ct(8, slices=60, nodules=4, rows=ROWS)
    assert not np.array_equal(chest.hu, other.hu)


def test_spine_is_deterministic_and_seed_dependent(spine) -> None:  # noqa: ANN001
    again = generate_spine_ct(11, rows=ROWS)
    assert np.array_equal(spine.hu, again.hu) and spine.vertebrae == again.vertebrae
    assert not np.array_equal(spine.hu, generate_spine_ct(12, rows=ROWS).hu[: spine.hu.shape[0]])


def test_chest_shapes_types_and_spacing_defaults(chest) -> None:  # noqa: ANN001
    assert chest.hu.dtype == np.int16 and chest.label_map.dtype == np.uint8
    assert chest.hu.shape == (60, ROWS, ROWS) and chest.body_part == "CHEST" and chest.vertebrae == []
    dz, sy, sx = chest.spacing
    assert 0.625 <= dz <= 2.5 and sy == sx
    assert 300 <= ROWS * sx <= 430  # the physical FOV stays ~350 mm whatever the matrix
    full = generate_chest_ct(3, rows=64)
    assert 250 <= full.hu.shape[0] * full.spacing[0] <= 360


def test_chest_hu_ranges(chest) -> None:  # noqa: ANN001
    hu = chest.hu.astype(np.float32)
    assert hu.min() >= -1024 and hu.max() > 500  # bone present
    lung = (hu > -950) & (hu < -700) & (chest.label_map == 0)
    assert abs(float(np.median(hu[lung])) + 850) < 40
    corner = hu[:, :5, :5]
    assert abs(float(corner.mean()) + 1000) < 30 and 8 < float(corner.std()) < 30  # air with noise


def test_nodules_in_lungs_fov_and_label_map(chest) -> None:  # noqa: ANN001
    assert len(chest.nodules) == 4
    z_top = chest.origin[2] + (chest.hu.shape[0] - 1) * chest.spacing[0]
    for n in chest.nodules:
        assert 3.0 <= n.diameter_mm <= 30.0 and n.kind in ("solid", "part-solid", "ground-glass")
        x, y, z = n.centre_mm
        assert chest.origin[2] <= z <= z_top
        k, r, c = (int(round(v)) for v in chest.patient_to_voxel(x, y, z))
        assert chest.label_map[k, r, c] == 1
        # the labelled voxels' centroid maps back to centre_mm within about a voxel
        kk, rr, cc = np.nonzero(chest.label_map)
        pts = np.stack([chest.voxel_to_patient(a, b, d) for a, b, d in zip(kk, rr, cc, strict=True)])
        near = np.linalg.norm(pts - np.array(n.centre_mm), axis=1) <= n.diameter_mm / 2 * 1.2 + 1
        centroid = pts[near].mean(axis=0)
        assert np.all(np.abs(centroid - np.array(n.centre_mm)) <= np.array(chest.spacing[::-1]) + 1.0)


def test_nodule_count_none_is_seeded_and_big_grid_geometry() -> None:
    counts = {len(generate_chest_ct(s, slices=30, rows=48).nodules) for s in range(6)}
    assert counts <= set(range(5)) and len(counts) > 1
    v = generate_chest_ct(1, slices=40, nodules=3, rows=64, spacing=(1.25, 5.0, 5.0))
    assert v.spacing == (1.25, 5.0, 5.0) and v.hu.shape == (40, 64, 64)
    for n in v.nodules:
        assert v.origin[2] <= n.centre_mm[2] <= v.origin[2] + 39 * 1.25


def test_juxtapleural_nodules_touch_the_wall() -> None:
    v = generate_chest_ct(4, slices=120, nodules=4, rows=128, spacing=(1.25, 1.5, 1.5))
    jp = [n for n in v.nodules if n.juxtapleural]
    assert jp, "seed should give at least one juxtapleural nodule"
    for n in jp:
        c = np.array(n.centre_mm)
        k, r, cc = (int(round(a)) for a in v.patient_to_voxel(*n.centre_mm))
        reach = int(np.ceil((n.diameter_mm / 2 + 4) / 1.5))
        box = (slice(max(k - reach, 0), k + reach + 1), slice(max(r - reach, 0), r + reach + 1),
               slice(max(cc - reach, 0), cc + reach + 1))
        kk, rr, xx = np.meshgrid(*(np.arange(b.start, min(b.stop, v.hu.shape[i])) for i, b in enumerate(box)),
                                 indexing="ij")
        pts = np.stack(v.voxel_to_patient(kk, rr, xx), axis=-1)
        dist = np.linalg.norm(pts - c, axis=-1)
        shell = (dist > n.diameter_mm / 2) & (dist < n.diameter_mm / 2 + 4.0)
        wall = (v.hu[box] > -200) & (v.label_map[box] == 0) & shell
        assert wall.sum() >= 3, f"juxtapleural nodule {n} has no chest wall next to it"


def test_juxtapleural_fraction_sets_the_share_and_the_default_keeps_each_seed() -> None:
    kw = {"slices": 60, "nodules": 4, "rows": 64, "spacing": (1.25, 5.0, 5.0)}
    assert all(n.juxtapleural for n in generate_chest_ct(5, juxtapleural_fraction=1.0, **kw).nodules)
    assert not any(n.juxtapleural for n in generate_chest_ct(5, juxtapleural_fraction=0.0, **kw).nodules)
    default, explicit = generate_chest_ct(5, **kw), generate_chest_ct(5, juxtapleural_fraction=0.3, **kw)
    assert default.nodules == explicit.nodules and np.array_equal(default.hu, explicit.hu)


def test_spine_levels_labels_and_centroids(spine) -> None:  # noqa: ANN001
    order = [idx for _, idx in LEVELS]
    got = [v.index for v in spine.vertebrae]
    assert 5 <= len(got) <= 16
    start = order.index(got[0])
    assert got == order[start : start + len(got)]  # consecutive levels
    assert set(got) <= set(np.unique(spine.label_map)) - {0}   # fragments of neighbours stay unannotated
    for v in spine.vertebrae:
        kk, rr, cc = np.nonzero(spine.label_map == v.index)
        expect = spine.voxel_to_patient(kk.mean(), rr.mean(), cc.mean())
        assert np.allclose(expect, v.centroid_mm, atol=1e-3)
        assert spine.hu[spine.label_map == v.index].mean() > 200  # bone


def test_only_levels_mostly_in_view_are_annotated() -> None:
    # seed 9000 (128 rows): T9 shows only 4% of its bone (a spinous process tip) above T10..L2
    v = generate_spine_ct(9000, rows=128)
    labelled = {int(k): int(n) for k, n in zip(*np.unique(v.label_map, return_counts=True), strict=True) if k}
    annotated = {x.index for x in v.vertebrae}
    fragments = set(labelled) - annotated
    assert fragments and annotated
    assert max(labelled[k] for k in fragments) < 0.2 * min(labelled[k] for k in annotated)


def test_ribs_only_on_thoracic_levels() -> None:
    seen_t = seen_other = 0
    for seed in range(6):
        v = generate_spine_ct(seed, rows=128, spacing=(2.0, 2.0, 2.0))
        xs = v.origin[0] + np.arange(v.hu.shape[2]) * v.spacing[2]
        for vert, below in zip(v.vertebrae[:-1], v.vertebrae[1:], strict=True):
            if vert.label in ("C1", "C2", "T1", "T12", "L4", "L5"):
                continue  # small first rib; iliac crests reach L4/L5; T12's slab reaches L1
            k0 = int(round(v.patient_to_voxel(*below.centroid_mm)[0]))
            k1 = int(round(v.patient_to_voxel(*vert.centroid_mm)[0]))
            lateral = np.abs(xs - vert.centroid_mm[0]) > 75.0
            slab = slice(max(k0, 0), min(k1 + 1, v.hu.shape[0]))
            bone = (v.hu[slab][:, :, lateral] > 400) & (v.label_map[slab][:, :, lateral] == 0)
            if vert.label.startswith("T"):
                assert bone.any(), f"seed {seed}: no rib beside {vert.label}"
                seen_t += 1
            else:
                assert not bone.any(), f"seed {seed}: rib-like bone beside {vert.label}"
                seen_other += 1
    assert seen_t and seen_other


def test_dicom_series_round_trip_and_annotations(tmp_path: Path) -> None:
    study = write_chest_ct_study(tmp_path / "chest", seed=5, slices=12, nodules=2, rows=ROWS)
    assert [p.name for p in study.files] == [f"CT{i:04d}.dcm" for i in range(1, 13)]
    dss = [pydicom.dcmread(p) for p in study.files]
    vol = np.stack([ds.pixel_array.astype(np.int32) * int(ds.RescaleSlope) + int(ds.RescaleIntercept)
                    for ds in dss])
    assert np.array_equal(vol, study.volume.hu)
    ds0 = dss[0]
    assert ds0.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2" and ds0.Modality == "CT"
    assert ds0.StudyInstanceUID == study.study_uid and ds0.SeriesInstanceUID == study.series_uid
    assert ds0.PatientName == "SYNTHETIC^CHEST^5" and ds0.PatientID == "SYN5" and ds0.BodyPartExamined == "CHEST"
    zs = [float(ds.ImagePositionPatient[2]) for ds in dss]
    assert np.allclose(np.diff(zs), study.volume.spacing[0])
    assert np.allclose([float(v) for v in ds0.ImagePositionPatient], study.volume.origin, atol=1e-5)
    assert study.annotations_path == tmp_path / "chest.annotations.csv"  # beside the DICOM folder
    with study.annotations_path.open() as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0].keys()) == ["seriesuid", "coordX", "coordY", "coordZ", "diameter_mm"]
    assert len(rows) == len(study.volume.nodules) == 2 and rows[0]["seriesuid"] == study.series_uid
    assert float(rows[0]["coordZ"]) == pytest.approx(study.volume.nodules[0].centre_mm[2], abs=1e-3)
    again = write_chest_ct_study(tmp_path / "again", seed=5, slices=12, nodules=2, rows=ROWS)
    assert again.files[3].read_bytes() == study.files[3].read_bytes()


def test_spine_study_centroids_json(tmp_path: Path) -> None:
    study = write_spine_ct_study(tmp_path / "spine", seed=2, slices=40, rows=64)
    assert study.annotations_path == tmp_path / "spine.centroids.json"  # beside the DICOM folder
    data = json.loads(study.annotations_path.read_text())
    assert data[0] == {"direction": ["L", "P", "S"]}
    assert [d["label"] for d in data[1:]] == [v.index for v in study.volume.vertebrae]
    assert set(data[1]) == {"label", "X", "Y", "Z"}
    assert pydicom.dcmread(study.files[0]).BodyPartExamined == "SPINE"


@pytest.mark.parametrize("ts", [ImplicitVRLittleEndian, RLELossless, JPEG2000Lossless, JPEGLSLossless])
def test_transfer_syntaxes_are_lossless(tmp_path: Path, ts: str) -> None:
    v = generate_spine_ct(1, slices=2, rows=64)
    files = write_ct_series(v, tmp_path, seed=1, series_description="ts test", transfer_syntax=ts)
    ds = pydicom.dcmread(files[1])
    assert ds.file_meta.TransferSyntaxUID == ts
    assert np.array_equal(ds.pixel_array.astype(np.int32) - 1024, v.hu[1])


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (dicom3tools) not installed")
@pytest.mark.parametrize("kind", ["chest", "spine"])
@pytest.mark.parametrize("ts", [ExplicitVRLittleEndian, RLELossless])
def test_dciodvfy_reports_no_errors(tmp_path: Path, kind: str, ts: str) -> None:
    gen = generate_chest_ct(2, slices=3, rows=64) if kind == "chest" else generate_spine_ct(2, slices=3, rows=64)
    files = write_ct_series(gen, tmp_path, seed=2, series_description=f"{kind} check", transfer_syntax=ts)
    res = subprocess.run(["dciodvfy", str(files[1])], capture_output=True, text=True, timeout=60)
    errors = [ln for ln in (res.stdout + res.stderr).splitlines() if ln.startswith("Error")]
    assert not errors, errors
