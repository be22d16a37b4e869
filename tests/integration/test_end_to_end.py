"""PACS -> dxgate -> model -> SR + SEG + GSPS back into the same study, with dcmtk as both peers."""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import pydicom
import pytest

from harness.dcmtk import StoreSCP, storescu
from harness.gateway import GSPS_CLASS, SEG_CLASS, SR_CLASS, start_gateway, write_config
from harness.models import operating_point_copy
from inference.validation import dciodvfy

pytestmark = pytest.mark.integration


def _by_class(scp: StoreSCP) -> dict[str, list]:
    out: dict[str, list] = {}
    for ds in scp.datasets():
        out.setdefault(str(ds.SOPClassUID), []).append(ds)
    return out


def test_storescu_study_comes_back_as_sr_seg_gsps(tmp_path: Path, chest_study, gateway_models: Path,
                                                   storescp_dest: StoreSCP) -> None:
    dest = {"name": "dest", "ae_title": storescp_dest.ae_title, "host": "127.0.0.1", "port": storescp_dest.port,
            "overlay": "gsps"}
    models = operating_point_copy(gateway_models, list(chest_study.files), tmp_path / "models")
    gw = start_gateway(write_config(tmp_path, models, destinations=[dest]))
    try:
        storescu(chest_study.files[0].parent, gw.dicom_port, "DXGATE")
        (job,) = gw.wait_job_states({"DONE", "FAILED"}, timeout=240)
        detail = gw.api(f"/jobs/{job['id']}")
        assert detail["state"] == "DONE", (detail["failed_stage"], detail["reason"], gw.log()[-3000:])
        assert len(detail["inputs"]) == 100
        for stage in ("receive", "quiet_wait", "load", "preprocess", "infer", "postprocess", "encode",
                      "validate", "send"):
            assert stage in detail["stage_seconds"], stage
        study = gw.api(f"/studies/{chest_study.study_uid}")
        assert study["state"] == "ROUTED"
    finally:
        gw.stop()

    source_headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in chest_study.files]
    source_uids = {str(h.SOPInstanceUID) for h in source_headers}
    received = _by_class(storescp_dest)
    assert SR_CLASS in received, received.keys()
    n_findings = detail["findings"]
    assert n_findings >= 1  # guaranteed by the operating point chosen above
    assert SEG_CLASS in received and GSPS_CLASS in received, received.keys()
    for datasets in received.values():
        for ds in datasets:
            assert ds.StudyInstanceUID == chest_study.study_uid
            assert ds.PatientID == source_headers[0].PatientID
            assert ds.PatientName == source_headers[0].PatientName
            path = tmp_path / f"{ds.SOPInstanceUID}.dcm"
            ds.save_as(path)
            report = dciodvfy(path)
            assert report.ok, (ds.SOPClassUID, report.errors)

    sr = hd.sr.Comprehensive3DSR.from_dataset(received[SR_CLASS][0])
    volumetric = sr.content.get_volumetric_roi_measurement_groups()
    planar = sr.content.get_planar_roi_measurement_groups()
    # per finding: a volumetric group (its SEG segment, or a SCOORD3D point) and a planar one on its centre slice
    assert len(volumetric) == len(planar) == n_findings
    assert {str(g.tracking_uid) for g in volumetric} == {str(g.tracking_uid) for g in planar}
    for group in volumetric:
        assert getattr(group, "referenced_segment", None) is not None or group.roi is not None
    for group in planar:
        (image,) = group.roi.ContentSequence  # SELECTED FROM: the centre slice (PS3.3 C.18.3)
        assert str(image.ReferencedSOPSequence[0].ReferencedSOPInstanceUID) in source_uids
    if SEG_CLASS in received:
        seg = hd.seg.Segmentation.from_dataset(received[SEG_CLASS][0])
        assert seg.number_of_segments >= 1
        referenced = {str(r.ReferencedSOPInstanceUID)
                      for r in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
        assert referenced and referenced <= source_uids  # SEG frames point at the source slices
