"""A late instance reopens a finished study: new epoch, a superseding job and an SR naming its predecessor.

DESIGN "Identity is stable": a job's key is (study, model, version, series set). A late slice in the
series the model reads changes the set -> a new job whose SR lists the earlier SR in its Predecessor
Documents Sequence (PS3.3 C.17.2.1). A late series the model does not read leaves the set unchanged ->
the study is routed again but no duplicate job is made.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from harness.dcmtk import StoreSCP, storescu
from harness.gateway import SR_CLASS, RunningGateway, start_gateway, write_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def late_study(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    """A 40-slice 256x256 synthetic chest CT with one nodule."""
    from training.synthetic import write_chest_ct_study

    return write_chest_ct_study(tmp_path_factory.mktemp("late_study"), seed=9, slices=40, nodules=1, rows=256)


def _normal(ds: pydicom.Dataset) -> np.ndarray:
    iop = np.asarray([float(v) for v in ds.ImageOrientationPatient])
    return np.cross(iop[:3], iop[3:])


def late_slice_in_series(files: list[Path], out: Path) -> tuple[Path, str]:
    """A new slice one spacing past the last slice of the (single) series: new SOP UID, same series."""
    headers = [(pydicom.dcmread(f, stop_before_pixels=True), f) for f in files]
    normal = _normal(headers[0][0])
    headers.sort(key=lambda h: float(np.dot(normal, [float(v) for v in h[0].ImagePositionPatient])))
    (prev, _), (last, last_path) = headers[-2], headers[-1]
    step = np.asarray([float(v) for v in last.ImagePositionPatient]) - [float(v) for v in prev.ImagePositionPatient]
    ds = pydicom.dcmread(last_path)
    ds.ImagePositionPatient = [round(float(v), 4) for v in np.asarray(ds.ImagePositionPatient, float) + step]
    if "SliceLocation" in ds:
        ds.SliceLocation = round(float(np.dot(normal, ds.ImagePositionPatient)), 4)
    ds.InstanceNumber = max(int(h.InstanceNumber) for h, _ in headers) + 1
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path, str(ds.SOPInstanceUID)


def one_slice_new_series(src: Path, out: Path) -> Path:
    """One slice copied into a new series (new Series/SOP Instance UIDs, another series number)."""
    ds = pydicom.dcmread(src)
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = int(ds.get("SeriesNumber") or 1) + 100
    ds.SeriesDescription = "late single image"
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def wait_study(gw: RunningGateway, study_uid: str, epoch: int, timeout: float = 60.0) -> dict[str, Any]:
    """The study once it reached `epoch` and was routed (or not) in that epoch."""
    deadline = time.monotonic() + timeout
    study: dict[str, Any] = {}
    while time.monotonic() < deadline:
        study = gw.api(f"/studies/{study_uid}")
        if study["epoch"] == epoch and study["state"] in ("ROUTED", "UNROUTED"):
            return study
        if gw.proc.poll() is not None:
            break
        time.sleep(0.25)
    raise AssertionError(f"study not routed in epoch {epoch}: {study}\n{gw.log()[-4000:]}")


def wait_job(gw: RunningGateway, job_id: int, timeout: float = 180.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    detail: dict[str, Any] = {}
    while time.monotonic() < deadline:
        detail = gw.api(f"/jobs/{job_id}")
        if detail["state"] in ("DONE", "FAILED"):
            return detail
        if gw.proc.poll() is not None:
            break
        time.sleep(0.25)
    raise AssertionError(f"job {job_id} did not finish: {detail}\n{gw.log()[-4000:]}")


def sr_uid(detail: dict[str, Any]) -> str:
    (sr,) = [o for o in detail["outputs"] if o["kind"] == "sr"]
    return str(sr["sop_instance_uid"])


def referenced_sops(seq: pydicom.Sequence) -> set[str]:
    """Every Referenced SOP Instance UID of a Hierarchical SOP Instance Reference sequence (PS3.3 C.17.2.1)."""
    return {str(sop.ReferencedSOPInstanceUID) for study in seq for series in study.ReferencedSeriesSequence
            for sop in series.ReferencedSOPSequence}


def test_late_instances_reopen_the_study(tmp_path: Path, late_study, gateway_models: Path,
                                         storescp_dest: StoreSCP) -> None:
    dest = {"name": "dest", "ae_title": storescp_dest.ae_title, "host": "127.0.0.1", "port": storescp_dest.port,
            "overlay": "gsps"}
    gw = start_gateway(write_config(tmp_path, gateway_models, destinations=[dest]))
    study_uid = late_study.study_uid
    try:
        storescu(late_study.files[0].parent, gw.dicom_port, "DXGATE")
        (first,) = gw.wait_job_states({"DONE", "FAILED"}, timeout=180)
        job1 = gw.api(f"/jobs/{first['id']}")
        assert job1["state"] == "DONE", job1
        assert wait_study(gw, study_uid, 1)["state"] == "ROUTED"

        # A late slice in the series the model reads: epoch 2, a new job superseding job 1.
        late_path, late_sop = late_slice_in_series(late_study.files, tmp_path / "late_slice")
        storescu(late_path, gw.dicom_port, "DXGATE")
        study = wait_study(gw, study_uid, 2)
        assert study["state"] == "ROUTED", study
        jobs = gw.api(f"/jobs?study_uid={study_uid}")
        assert len(jobs) == 2, jobs
        job2 = wait_job(gw, max(j["id"] for j in jobs))
        assert job2["state"] == "DONE", job2
        assert job2["supersedes_job_id"] == job1["id"]
        assert job2["study_epoch"] == 2
        assert late_sop in job2["inputs"] and len(job2["inputs"]) == len(job1["inputs"]) + 1
        assert set(job1["inputs"]) < set(job2["inputs"])

        # A late one-image series the model does not read: routed again (epoch 3), same input set, no new job.
        storescu(one_slice_new_series(late_study.files[0], tmp_path / "late_series"), gw.dicom_port, "DXGATE")
        study = wait_study(gw, study_uid, 3)
        assert study["state"] == "ROUTED", study
        assert len(study["series"]) == 2
        time.sleep(1.0)  # a duplicate job would have been made in the same routing pass; give the loops a beat
        jobs = gw.api(f"/jobs?study_uid={study_uid}")
        assert sorted(j["id"] for j in jobs) == sorted([job1["id"], job2["id"]]), jobs
        assert all(j["state"] == "DONE" for j in jobs), jobs
    finally:
        gw.stop()

    srs = {str(ds.SOPInstanceUID): ds for ds in storescp_dest.datasets()
           if ds.SOPClassUID == SR_CLASS and ds.StudyInstanceUID == study_uid}
    assert set(srs) == {sr_uid(job1), sr_uid(job2)}, srs.keys()
    first_sr, second_sr = srs[sr_uid(job1)], srs[sr_uid(job2)]
    assert "PredecessorDocumentsSequence" not in first_sr
    assert referenced_sops(second_sr.PredecessorDocumentsSequence) == {sr_uid(job1)}
    assert second_sr.PredecessorDocumentsSequence[0].StudyInstanceUID == study_uid
