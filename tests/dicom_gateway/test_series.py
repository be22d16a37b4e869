"""Series summaries (from rows and from DICOM files), orientation classification and series selection."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from dicom_gateway.route.rules import select_series
from dicom_gateway.route.series import SeriesSummary, classify_orientation, summarise_folder, summarise_series
from dicom_gateway.store import InstanceRecord, Store
from inference.model_card import ModelCard

AXIAL = (1, 0, 0, 0, 1, 0)
CORONAL = (1, 0, 0, 0, 0, -1)
SAGITTAL = (0, 1, 0, 0, 0, -1)


def card(**series: object) -> ModelCard:
    prefs = {"modalities": ["CT"], "orientation": ["axial"], "min_slices": 16, **series}
    return ModelCard.model_validate({
        "name": "lung_nodule_ct", "version": "1.0.0", "task": "lung-nodule-detection", "description": "test",
        "modality": ["CT"], "body_part": ["CHEST"], "postprocess": "nodules",
        "input": {"spacing_mm": [1, 1, 1], "window": [-1000, 400], "roi_size": [32, 32, 32]},
        "output": {"channels": 1}, "labels": [], "series": prefs, "weights_sha256": "0" * 64})


def summary(uid: str, orientation: str | None, thickness: float | None, n: int, modality: str = "CT",
            number: int | None = None) -> SeriesSummary:
    return SeriesSummary(series_uid=uid, modality=modality, body_part="CHEST", series_description=None,
                         series_number=number, slice_thickness=thickness, orientation=orientation, n_instances=n,
                         calling_ae=None, sop_instance_uids=tuple(f"{uid}.{i}" for i in range(n)), paths=())


@pytest.mark.parametrize(("iop", "expected"), [
    (AXIAL, "axial"),
    (CORONAL, "coronal"),
    (SAGITTAL, "sagittal"),
    ((0, -1, 0, 0, 0, -1), "sagittal"),  # the normal's sign does not matter
    ((0.996, 0.087, 0, -0.087, 0.996, 0), "axial"),  # 5 degrees in-plane rotation is still axial
    ((1, 0, 0, 0, 0.94, -0.342), "axial"),  # 20 degrees gantry tilt: |n_z| = 0.94
    ((1, 0, 0, 0, 0.866, -0.5), "oblique"),  # 30 degrees: beyond dicom_headers' 25 degree tolerance
    ((1, 0, 0, 0, 0.707, -0.707), "oblique"),  # 45 degrees: |n| components 0.707 < 0.8
    ((1, 0, 0, 0, 1, 0, 0), None),
    ((1, 0, 0, 1, 0, 0), None),  # parallel row and column
    (None, None),
])
def test_classify_orientation(iop: tuple[float, ...] | None, expected: str | None) -> None:
    assert classify_orientation(iop) == expected


def test_summarise_rows_majority_and_order() -> None:
    other = {"series_uid": "9.2", "sop_instance_uid": "9.2.1", "modality": "CT", "series_number": 2,
             "orientation": "axial", "instance_number": 1, "slice_thickness": 1.0, "path": "/a"}
    rows = [{"series_uid": "9.1", "sop_instance_uid": f"9.1.{i}", "modality": "CT", "series_number": 1,
             "orientation": "oblique" if i == 2 else "axial", "instance_number": 3 - i, "slice_thickness": 5.0,
             "calling_ae": "PACS", "path": f"/s/{i}"} for i in range(3)]
    out = summarise_series([other, *rows])
    assert [s.series_uid for s in out] == ["9.1", "9.2"]
    first = out[0]
    assert first.orientation == "axial"
    assert first.n_instances == 3
    assert first.sop_instance_uids == ("9.1.2", "9.1.1", "9.1.0")  # by instance number
    assert first.slice_thickness == 5.0 and first.calling_ae == "PACS" and first.body_part is None


def test_summarise_jobstore_rows(tmp_path: Path) -> None:
    store = Store(tmp_path / "jobs.sqlite3", durable=False)
    for i in range(4):
        store.instances.record(InstanceRecord(
            sop_instance_uid=f"1.5.{i}", sop_class_uid=CTImageStorage, study_uid="1.5", series_uid="1.5.100",
            transfer_syntax=ExplicitVRLittleEndian, path=f"/spool/{i}.dcm", size=10, calling_ae="PACS",
            association_id=None, modality="CT", body_part="CHEST", series_number=7, slice_thickness=2.5,
            orientation="axial", instance_number=i + 1))
    (s,) = summarise_series(store.instances.of_study("1.5"))
    assert (s.series_uid, s.n_instances, s.series_number, s.slice_thickness, s.study_uid) == (
        "1.5.100", 4, 7, 2.5, "1.5")
    assert s.paths == tuple(f"/spool/{i}.dcm" for i in range(4))
    store.close()


def _write(path: Path, study: str, series: str, number: int, iop: tuple[float, ...], thickness: float,
           instance: int) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.Modality, ds.BodyPartExamined, ds.SeriesDescription = "CT", "CHEST", f"series {number}"
    ds.SeriesNumber, ds.InstanceNumber = number, instance
    ds.SliceThickness = thickness
    ds.ImageOrientationPatient = list(iop)
    ds.ImagePositionPatient = [0, 0, float(instance)]
    ds.Rows = ds.Columns = 4
    ds.save_as(path, enforce_file_format=True)


def test_summarise_folder(tmp_path: Path) -> None:
    study = generate_uid()
    axial, coronal = generate_uid(), generate_uid()
    (tmp_path / "sub").mkdir()
    for i in range(3):
        _write(tmp_path / f"a{i}.dcm", study, axial, 2, AXIAL, 1.25, i + 1)
    for i in range(2):
        _write(tmp_path / "sub" / f"c{i}", study, coronal, 5, CORONAL, 3.0, i + 1)
    (tmp_path / "README.txt").write_text("not DICOM")
    _write(tmp_path / "nouid.dcm", study, generate_uid(), 9, AXIAL, 1.0, 1)
    ds = pydicom.dcmread(tmp_path / "nouid.dcm")
    del ds.SeriesInstanceUID
    ds.save_as(tmp_path / "nouid.dcm")
    out = summarise_folder(tmp_path)
    assert [(s.series_uid, s.orientation, s.n_instances, s.slice_thickness, s.series_number) for s in out] == [
        (axial, "axial", 3, 1.25, 2), (coronal, "coronal", 2, 3.0, 5)]
    assert out[0].study_uid == study and out[0].modality == "CT" and out[0].body_part == "CHEST"
    assert all(Path(p).is_file() for p in out[0].paths)


def test_select_thinnest_axial_ct() -> None:
    candidates = [summary("5mm", "axial", 5.0, 60, number=2), summary("1mm", "axial", 1.0, 300, number=3),
                  summary("cor", "coronal", 1.0, 400, number=4)]
    chosen, reason = select_series(card(), candidates)
    assert chosen is not None and chosen.series_uid == "1mm" and reason == ""


def test_select_most_slices_and_ties() -> None:
    candidates = [summary("a", "axial", 5.0, 60), summary("b", "axial", 1.0, 30), summary("c", "axial", 1.0, 40)]
    assert select_series(card(prefer="most_slices"), candidates)[0].series_uid == "a"
    assert select_series(card(), candidates)[0].series_uid == "c"  # equal thickness -> more images


def test_select_respects_max_thickness_and_modality_case() -> None:
    candidates = [summary("thick", "axial", 5.0, 60), summary("thin", "axial", 2.0, 60, modality="ct")]
    chosen, _ = select_series(card(max_slice_thickness_mm=3.0, prefer="most_slices"), candidates)
    assert chosen is not None and chosen.series_uid == "thin"


def test_select_none_usable_gives_reason() -> None:
    candidates = [summary("cor", "coronal", 1.0, 400, number=4), summary("few", "axial", 1.0, 8, number=5),
                  replace(summary("mr", "axial", 1.0, 50), modality="MR")]
    chosen, reason = select_series(card(max_slice_thickness_mm=3.0), candidates)
    assert chosen is None
    assert reason.startswith("no axial CT series with ≥ 16 slices and thickness ≤ 3 mm; found: ")
    assert "#4 cor (CT, coronal, 1 mm, 400 images)" in reason
    assert "#5 few (CT, axial, 1 mm, 8 images)" in reason and "mr (MR, axial" in reason
    assert select_series(card(), [])[1].endswith("found: none")
