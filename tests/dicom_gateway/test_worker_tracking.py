"""A superseding job's outputs keep the Tracking UIDs the superseded SR (read from the outbox) gave its findings."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pydicom
from pydicom.uid import generate_uid

from dicom_gateway.settings import Settings
from dicom_gateway.work.worker import Worker
from inference.encode import encode_seg, encode_sr
from tests.inference.encode_fixtures import build_ct_series, nodule_card, shared_label_result


class _Jobs:
    def __init__(self, earlier: list[dict[str, Any]]) -> None:
        self.earlier = earlier

    def earlier_outputs(self, job_id: int) -> list[dict[str, Any]]:
        return self.earlier

    def record_stages(self, *args: object) -> None:
        pass


def test_superseding_outputs_keep_the_earlier_tracking_uids(tmp_path: Path) -> None:
    sources = build_ct_series()
    paths = []
    for ds in sources:
        path = tmp_path / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    card = nodule_card()
    old = shared_label_result(sources, card)
    old_sr = encode_sr(old, card, sources, seg=encode_seg(old, card, sources))
    old_path = tmp_path / "old_sr.dcm"
    old_sr.save_as(old_path, enforce_file_format=True)
    earlier = [{"kind": "sr", "path": str(old_path), "series_instance_uid": str(old_sr.SeriesInstanceUID),
                "sop_instance_uid": str(old_sr.SOPInstanceUID)},
               {"kind": "sr", "path": str(tmp_path / "removed.dcm"), "series_instance_uid": "1.2.3",
                "sop_instance_uid": "1.2.3.4"}]   # an earlier report no longer in the outbox is skipped
    # the re-run finds the same nodules; postprocessing gives them new UIDs
    new = dataclasses.replace(old, findings=[dataclasses.replace(f, tracking_uid=generate_uid())
                                             for f in old.findings])
    worker = Worker(Settings(data_dir=tmp_path / "var"), SimpleNamespace(jobs=_Jobs(earlier)), {})  # type: ignore[arg-type]
    outputs = worker._encode_and_validate({"id": 2, "destinations": json.dumps([])}, SimpleNamespace(card=card),
                                          new, paths, [])
    by_kind = {o["kind"]: pydicom.dcmread(o["path"]) for o in outputs}
    assert set(by_kind) == {"sr", "seg", "gsps"}
    old_uids = {f.tracking_uid for f in old.findings}
    sr_uids = {str(e.value) for e in by_kind["sr"].iterall() if e.keyword == "UID"
               and str(e.value) in old_uids | {f.tracking_uid for f in new.findings}}
    assert sr_uids == old_uids
    assert {str(s.TrackingUID) for s in by_kind["seg"].SegmentSequence} == old_uids
    assert {str(o.TrackingUID) for a in by_kind["gsps"].GraphicAnnotationSequence
            for o in a.GraphicObjectSequence} == old_uids
    (study,) = by_kind["sr"].PredecessorDocumentsSequence
    assert {str(s.ReferencedSOPSequence[0].ReferencedSOPInstanceUID) for s in study.ReferencedSeriesSequence} == {
        str(old_sr.SOPInstanceUID), "1.2.3.4"}
