"""Real-format readers on small fixtures written in each format (no downloads)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from training.loaders import LoaderError, load_luna16, load_tianchi, load_verse, read_datalist, write_datalist
from training.loaders.datalist import verify_sha256sums

try:
    from tests.training.fixtures_formats import LUNA_UIDS, write_luna16, write_tianchi, write_verse
except ImportError:  # run without the tests package on sys.path
    from fixtures_formats import LUNA_UIDS, write_luna16, write_tianchi, write_verse


def test_luna16_geometry_and_annotations(tmp_path):
    expected = write_luna16(tmp_path)
    cases = load_luna16(tmp_path)
    assert [c.series_uid for c in cases] == sorted(LUNA_UIDS)
    for case in cases:
        exp = expected[case.series_uid]
        assert case.size == exp["size"]
        assert case.spacing == pytest.approx(exp["spacing"])
        assert case.origin == pytest.approx(exp["origin"])
        assert case.direction == pytest.approx(exp["direction"])
        assert case.subset is not None and case.subset.startswith("subset")
        assert [n.centre_mm for n in case.nodules] == [pytest.approx(w) for w in exp["world"]]
        # world <-> voxel agrees with SimpleITK's own mapping, also for the permuted/flipped direction
        ijk = case.world_to_voxel(np.array([n.centre_mm for n in case.nodules]))
        np.testing.assert_allclose(ijk, exp["ijk"], atol=1e-9)
        np.testing.assert_allclose(case.voxel_to_world(ijk), [n.centre_mm for n in case.nodules], atol=1e-9)
        img = sitk.ReadImage(str(case.image_path))
        for k, ijk_k in enumerate(exp["ijk"]):
            np.testing.assert_allclose(case.voxel_to_world(ijk_k), img.TransformContinuousIndexToPhysicalPoint(ijk_k))
            assert case.nodules[k].diameter_mm == 5.0 + k
    first, second = cases
    assert sum(c.is_nodule for c in first.candidates) == 2 and len(first.candidates) == 3
    assert len(second.excluded) == 1 and second.excluded[0].diameter_mm == -1.0
    assert first.excluded == ()


def test_luna16_errors_name_the_problem(tmp_path):
    with pytest.raises(LoaderError, match="annotations.csv"):
        load_luna16(tmp_path)
    (tmp_path / "annotations.csv").write_text("seriesuid,coordX,coordY\n1,2,3\n")
    with pytest.raises(LoaderError, match="missing column"):
        load_luna16(tmp_path)


def test_verse_centroids_to_lps(tmp_path):
    expected = write_verse(tmp_path)
    (case,) = load_verse(tmp_path)
    assert case.subject == "sub-verse900_dir-ax"
    assert case.mask_path is not None and case.mask_path.name.endswith("_seg-vert_msk.nii.gz")
    assert [c.label for c in case.centroids] == [20, 21, 22]          # the NaN entry (23) is skipped
    assert [c.name for c in case.centroids] == ["L1", "L2", "L3"]
    for c in case.centroids:
        np.testing.assert_allclose(c.centre_mm, expected[c.label], atol=1e-3)


@pytest.mark.parametrize("axcodes", [("L", "A", "S"), ("I", "P", "L")])
def test_verse_other_centroid_orientations(tmp_path, axcodes):
    expected = write_verse(tmp_path, axcodes=axcodes)
    (case,) = load_verse(tmp_path)
    for c in case.centroids:
        np.testing.assert_allclose(c.centre_mm, expected[c.label], atol=1e-3)


def test_tianchi_keypoints(tmp_path):
    expected = write_tianchi(tmp_path)
    cases = load_tianchi(tmp_path)
    assert {c.study_uid for c in cases} == set(expected)               # the study not on disk is skipped
    for case in cases:
        exp = expected[case.study_uid]
        assert case.instance_uid == exp["instance_uid"] and case.series_uid == exp["series_uid"]
        assert case.image_path.name == "image1.dcm" and len(case.series_paths) == 2
        assert case.pixel_spacing == (0.5, 0.6)
        assert {k.tag for k in case.keypoints} == set(exp["points"])
        for tag, (classes, xy, mm) in exp["points"].items():
            kp = case.keypoint(tag)
            assert kp is not None
            assert kp.classes == classes and kp.xy_px == xy and kp.z_index == 2
            assert kp.kind == ("disc" if "-" in tag else "vertebra")
            np.testing.assert_allclose(kp.centre_mm, mm)


def test_datalist_round_trip_with_checksums(tmp_path):
    write_luna16(tmp_path / "luna")
    write_verse(tmp_path / "verse")
    luna = load_luna16(tmp_path / "luna")
    out = write_datalist(luna, tmp_path / "luna" / "datalist.json", "luna16-fixture",
                         splits={"test": [LUNA_UIDS[1]]})
    doc = json.loads(out.read_text())
    assert [e["seriesuid"] for e in doc["test"]] == [LUNA_UIDS[1]] and doc["numTraining"] == 1
    assert doc["validation"] == []
    test = read_datalist(out, "test")
    assert test[0]["image"].endswith(".mhd") and test[0]["nodules"][0][3] == 5.0
    assert read_datalist(out, "validation") == []
    sums = (tmp_path / "luna" / "SHA256SUMS").read_text().splitlines()
    assert len(sums) == 4 and any(line.endswith(".raw") for line in sums)       # .mhd + .raw per scan
    assert verify_sha256sums(tmp_path / "luna") == []
    raw = next((tmp_path / "luna").rglob("*.raw"))
    raw.write_bytes(raw.read_bytes()[:-2] + b"\x01\x02")
    assert verify_sha256sums(tmp_path / "luna") == [raw.relative_to(tmp_path / "luna").as_posix()]

    spine = load_verse(tmp_path / "verse")
    out = write_datalist(spine, tmp_path / "verse" / "spine.json", "verse-fixture", val_fraction=0.0)
    (entry,) = read_datalist(out, "training")
    assert entry["label"].endswith("_seg-vert_msk.nii.gz") and entry["centroids"][0][0] == 20
    assert verify_sha256sums(tmp_path / "verse") == []
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps({"training": []}))
    with pytest.raises(LoaderError, match="no 'test'"):
        read_datalist(partial, "test")


def test_datalist_split_is_seeded_and_complete(tmp_path):
    write_tianchi(tmp_path)
    cases = load_tianchi(tmp_path)
    out = write_datalist(cases, tmp_path / "dl.json", "tianchi", val_fraction=0.5, seed=3)
    doc = json.loads(out.read_text())
    ids = sorted(e["study_uid"] for k in ("training", "validation", "test") for e in doc[k])
    assert ids == sorted(c.study_uid for c in cases) and len(doc["validation"]) == 1
    again = json.loads(write_datalist(cases, tmp_path / "dl2.json", "tianchi", val_fraction=0.5, seed=3).read_text())
    assert again["validation"] == doc["validation"]
    assert doc["training"][0]["keypoints"][0]["tag"] == "L1"
