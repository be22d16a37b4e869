"""Durability gaps: what a crash leaves half-done is undone at start-up (spool files without a row, outbox
files no job records), and a send cut off mid-way resends only what the destination did not acknowledge."""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pynetdicom import AE, AllStoragePresentationContexts, evt

from dicom_gateway.send.sender import Sender
from dicom_gateway.server import Gateway
from dicom_gateway.settings import Destination, SenderSettings, Settings
from dicom_gateway.states import DeliveryState, JobState
from dicom_gateway.store import InstanceRecord, Store
from dicom_gateway.work.outbox import remove_unreferenced
from harness.ct import write_ct
from harness.dcmtk import storescp
from harness.system import free_port


def _record(store: Store, path: Path) -> None:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    store.instances.record(InstanceRecord(
        sop_instance_uid=ds.SOPInstanceUID, sop_class_uid=ds.SOPClassUID, study_uid=ds.StudyInstanceUID,
        series_uid=ds.SeriesInstanceUID, transfer_syntax=ds.file_meta.TransferSyntaxUID, path=str(path),
        size=path.stat().st_size, calling_ae="PACS", association_id=None, modality="CT"))


def _spool_path(spool: Path, name: str, study: str = "1.2.826.0.1.1") -> Path:
    path = write_ct(spool / "tmp" / f"{name}.dcm", study_uid=study)
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    final = spool / str(ds.StudyInstanceUID) / str(ds.SeriesInstanceUID) / f"{ds.SOPInstanceUID}.dcm"
    final.parent.mkdir(parents=True, exist_ok=True)
    path.rename(final)
    return final


def _encoded_job(store: Store, outputs: list[dict[str, Any]], destinations: list[str]) -> int:
    job_id, _ = store.jobs.create(study_uid="1.2.3.9", model="m", model_version="1", series_uid="1.2.3.9.1",
                                  input_uids=["1.2.3.9.1.1"], destinations=destinations, rule="r")
    assert store.jobs.claim("w", 60)["id"] == job_id
    store.jobs.finish_encoding(job_id, outputs, "0" * 64, 1, destinations, worker_id="w")
    return job_id


def _outputs(folder: Path, kinds: tuple[str, ...] = ("sr", "seg", "gsps")) -> list[dict[str, Any]]:
    out = []
    for n, kind in enumerate(kinds):
        path = write_ct(folder / f"{n:02d}_{kind}.dcm", series_description=kind)
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        out.append({"kind": kind, "path": str(path), "sop_instance_uid": str(ds.SOPInstanceUID),
                    "sop_class_uid": str(ds.SOPClassUID)})
    return out


def test_start_up_removes_unrecorded_spool_files_and_stray_outbox_files(tmp_path: Path, smoke_models_dir: Path,
                                                                         caplog: pytest.LogCaptureFixture) -> None:
    settings = Settings(data_dir=tmp_path / "var", models_dir=smoke_models_dir, dicom_port=free_port(), rules=[])
    gateway = Gateway(settings)
    spool, outbox = settings.spool_dir, settings.outbox_dir
    recorded = _spool_path(spool, "a")
    _record(gateway.store, recorded)
    unrecorded = _spool_path(spool, "b")  # fsync'ed, then the process died before the commit
    kept = _outputs(outbox / "1", ("sr",))
    job_id = _encoded_job(gateway.store, kept, [])
    assert job_id == 1
    stray = write_ct(outbox / "1" / "01_seg_unrecorded.dcm")  # written, never recorded
    orphan_folder = outbox / "7"
    write_ct(orphan_folder / "00_sr.dcm")  # a job that never got its outputs recorded
    with caplog.at_level(logging.WARNING):
        gateway.start()
        gateway.stop()
    assert recorded.is_file() and not unrecorded.exists()
    assert Path(kept[0]["path"]).is_file() and not stray.exists() and not orphan_folder.exists()
    message = next(r.getMessage() for r in caplog.records if "recovered after an unclean stop" in r.getMessage())
    assert "1 unrecorded spool file(s) removed" in message and "2 stray outbox file(s) removed" in message


def test_remove_unreferenced_keeps_what_jobs_record(tmp_path: Path) -> None:
    outbox = tmp_path / "outbox"
    keep = [write_ct(outbox / "3" / "00_sr.dcm"), write_ct(outbox / "4" / "00_sr.dcm")]
    drop = [write_ct(outbox / "3" / "01_seg.dcm"), write_ct(outbox / "5" / "00_sr.dcm")]
    assert remove_unreferenced(outbox, set(keep)) == 2
    assert all(p.is_file() for p in keep) and not any(p.exists() for p in drop)
    assert sorted(p.name for p in outbox.iterdir()) == ["3", "4"]


class AbortingSCP:
    """A pynetdicom Storage SCP that stores the first `keep` C-STOREs and aborts the association on the next."""

    def __init__(self, keep: int) -> None:
        self.keep, self.received = keep, []
        self.lock = threading.Lock()
        self.ae = AE(ae_title="ABORTER")
        self.ae.supported_contexts = AllStoragePresentationContexts
        self.port = free_port()
        self.server = self.ae.start_server(("127.0.0.1", self.port), block=False,
                                           evt_handlers=[(evt.EVT_C_STORE, self._on_store)])

    def _on_store(self, event: evt.Event) -> int:
        with self.lock:
            if len(self.received) >= self.keep:
                event.assoc.abort()
                return 0xA700
            self.received.append(str(event.request.AffectedSOPInstanceUID))
            return 0x0000

    def stop(self) -> None:
        self.server.shutdown()


def test_resend_after_an_abort_sends_only_what_was_not_acknowledged(tmp_path: Path) -> None:
    aborter = AbortingSCP(keep=2)
    try:
        dest = Destination(name="pacs", ae_title="ABORTER", host="127.0.0.1", port=aborter.port)
        sender_cfg = SenderSettings(max_attempts=5, backoff_initial_s=0.01, backoff_max_s=0.01, timeout_s=5)
        settings = Settings(data_dir=tmp_path / "var", destinations=[dest], sender=sender_cfg)
        store = Store(settings.db_path)
        outputs = _outputs(tmp_path / "outbox")
        job_id = _encoded_job(store, outputs, ["pacs"])
        assert Sender(settings, store).run_once() == 1
    finally:
        aborter.stop()
    uids = [o["sop_instance_uid"] for o in outputs]
    assert aborter.received == uids[:2]
    delivery = store.deliveries.of_job(job_id)[0]
    assert delivery["state"] == DeliveryState.PENDING and json.loads(delivery["sent_uids"]) == uids[:2]

    with storescp(tmp_path / "dest", "ABORTER") as scp:  # the destination is back
        retry = settings.model_copy(update={"destinations": [dest.model_copy(update={"port": scp.port})]})
        later = Sender(retry, store, clock=lambda: delivery["next_attempt_at"] + 1)
        assert later.run_once() == 1
        received = [str(ds.SOPInstanceUID) for ds in scp.datasets()]
    assert received == uids[2:]  # only the one not acknowledged, with the same UID
    assert store.jobs.get(job_id)["state"] == JobState.DONE
    assert json.loads(store.deliveries.of_job(job_id)[0]["sent_uids"]) == uids


def test_replay_of_a_dead_letter_keeps_the_acknowledged_a_resend_of_a_done_job_clears_them(tmp_path: Path) -> None:
    store = Store(tmp_path / "jobs.sqlite3")
    outputs = _outputs(tmp_path / "outbox")
    job_id = _encoded_job(store, outputs, ["pacs"])
    store.deliveries.acknowledge(job_id, "pacs", outputs[0]["sop_instance_uid"])
    store.deliveries.acknowledge(job_id, "pacs", outputs[0]["sop_instance_uid"])  # idempotent
    store.deliveries.record(job_id, "pacs", ok=False, error="association aborted")  # a dead letter
    assert store.jobs.get(job_id)["state"] == JobState.FAILED
    assert store.jobs.replay(job_id) == JobState.SENDING
    assert json.loads(store.deliveries.of_job(job_id)[0]["sent_uids"]) == [outputs[0]["sop_instance_uid"]]
    store.deliveries.record(job_id, "pacs", ok=True)
    assert store.jobs.get(job_id)["state"] == JobState.DONE
    assert store.jobs.replay(job_id) == JobState.SENDING  # a deliberate resend of everything
    assert json.loads(store.deliveries.of_job(job_id)[0]["sent_uids"]) == []
