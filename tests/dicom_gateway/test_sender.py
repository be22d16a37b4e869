"""Result sender: retries with back-off, exactly one delivery once the peer is up, dead letters, isolation."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path
from typing import Any

import pydicom
import pytest

from dicom_gateway.send.sender import Sender, outputs_for
from dicom_gateway.settings import Destination, SenderSettings, Settings
from dicom_gateway.states import DeliveryState, JobState
from dicom_gateway.store import Store
from harness.ct import write_ct
from harness.dcmtk import start_storescp, storescp
from harness.system import free_port


class FakeClock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def _outputs(folder: Path, kinds: tuple[str, ...] = ("sr", "seg", "gsps")) -> list[dict[str, Any]]:
    out = []
    for kind in kinds:
        path = write_ct(folder / f"{kind}.dcm", series_description=kind)
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        out.append({"kind": kind, "path": str(path), "sop_instance_uid": str(ds.SOPInstanceUID),
                    "sop_class_uid": str(ds.SOPClassUID)})
    return out


def _encoded_job(store: Store, outputs: list[dict[str, Any]], destinations: list[str], n: int = 0) -> int:
    job_id, _ = store.jobs.create(study_uid=f"1.2.3.{n}", model="m", model_version="1", series_uid="1.2.3.4",
                                  input_uids=[f"1.2.3.4.{n}"], destinations=destinations, rule="r")
    claimed = store.jobs.claim("w", 60)
    assert claimed is not None and claimed["id"] == job_id
    store.jobs.finish_encoding(job_id, outputs, "sha", 1, destinations)
    return job_id


def _settings(tmp_path: Path, destinations: list[Destination], **sender: Any) -> Settings:
    cfg = {"max_attempts": 6, "backoff_initial_s": 1.0, "backoff_max_s": 60.0, "timeout_s": 2.0, **sender}
    return Settings(data_dir=tmp_path / "var", destinations=destinations, sender=SenderSettings(**cfg))


def _dest(name: str, port: int, **kw: Any) -> Destination:
    return Destination(name=name, ae_title="STORESCP", host="127.0.0.1", port=port, **kw)


def _delivery(store: Store, job_id: int, name: str) -> Any:
    return next(r for r in store.deliveries.of_job(job_id) if r["destination"] == name)


def test_outputs_filtered_by_destination() -> None:
    outs = [{"kind": k} for k in ("sr", "seg", "gsps", "sc")]
    assert [o["kind"] for o in outputs_for(_dest("a", 1), outs)] == ["sr", "seg", "gsps"]
    assert [o["kind"] for o in outputs_for(_dest("b", 1, overlay="sc", send_seg=False), outs)] == ["sr", "sc"]
    assert outputs_for(_dest("c", 1, overlay="none", send_sr=False, send_seg=False), outs) == []


@pytest.mark.integration
def test_destination_down_then_up_delivers_exactly_once(tmp_path: Path) -> None:
    port = free_port()
    settings = _settings(tmp_path, [_dest("pacs", port, overlay="sc", send_seg=False)])
    store = Store(settings.db_path)
    job_id = _encoded_job(store, _outputs(tmp_path / "out", ("sr", "seg", "gsps", "sc")), ["pacs"])
    clock = FakeClock()
    sender = Sender(settings, store, clock=clock)

    assert sender.run_once() == 1  # nobody listening: a failed attempt, retry in 1 s
    d = _delivery(store, job_id, "pacs")
    assert (d["state"], d["attempts"]) == (DeliveryState.PENDING, 1) and "association" in d["last_error"]
    assert d["next_attempt_at"] == pytest.approx(clock.now + 1.0)
    assert store.jobs.get(job_id)["state"] == JobState.SENDING
    assert sender.run_once() == 0  # not due yet

    with storescp(tmp_path / "pacs", port=port) as peer:
        clock.now += 1.5
        assert sender.run_once() == 1
        assert sender.run_once() == 0
        received = peer.files()
    assert store.jobs.get(job_id)["state"] == JobState.DONE
    assert _delivery(store, job_id, "pacs")["state"] == DeliveryState.SENT
    kinds = sorted(str(pydicom.dcmread(p, stop_before_pixels=True).SeriesDescription) for p in received)
    assert kinds == ["sc", "sr"]  # exactly once each; SEG and GSPS filtered out for this destination


@pytest.mark.integration
def test_dead_destination_does_not_block_a_live_one(tmp_path: Path) -> None:
    """A peer that accepts TCP but never answers costs its own timeout only; the live one is served."""
    with socket.socket() as blackhole:
        blackhole.bind(("127.0.0.1", 0))
        blackhole.listen(8)  # never accept()ed: the A-ASSOCIATE-RQ is never answered
        peer = start_storescp(tmp_path / "live")
        try:
            settings = _settings(tmp_path, [_dest("dead", blackhole.getsockname()[1]), _dest("live", peer.port)],
                                 timeout_s=3.0)
            store = Store(settings.db_path)
            jobs = [_encoded_job(store, _outputs(tmp_path / f"out{n}", ("sr",)), ["dead", "live"], n)
                    for n in range(2)]
            sender = Sender(settings, store)
            done = threading.Event()
            t0 = time.monotonic()
            runner = threading.Thread(target=lambda: (sender.run_once(), done.set()))
            runner.start()
            while not all(_delivery(store, j, "live")["state"] == DeliveryState.SENT for j in jobs):
                assert time.monotonic() - t0 < 2.7, "the live destination waited for the dead one"
                time.sleep(0.02)
            assert not done.is_set()  # the dead destination is still timing out
            runner.join(timeout=10)
            assert done.is_set()
            assert len(peer.files()) == 2
        finally:
            peer.stop()
    for j in jobs:
        dead = _delivery(store, j, "dead")
        assert (dead["state"], dead["attempts"]) == (DeliveryState.PENDING, 1)
        assert store.jobs.get(j)["state"] == JobState.SENDING


def test_max_attempts_makes_a_dead_letter(tmp_path: Path) -> None:
    settings = _settings(tmp_path, [_dest("pacs", free_port())], max_attempts=3, backoff_initial_s=2,
                         backoff_max_s=3)
    store = Store(settings.db_path)
    job_id = _encoded_job(store, _outputs(tmp_path / "out", ("sr",)), ["pacs"])
    clock = FakeClock()
    sender = Sender(settings, store, clock=clock)
    waits = []
    for _ in range(3):
        assert sender.run_once() == 1
        d = _delivery(store, job_id, "pacs")
        waits.append(round(d["next_attempt_at"] - clock.now, 3))
        clock.now += 10
    assert waits[:2] == [2.0, 3.0]  # 2 * 2**0, min(2 * 2**1, 3)
    d = _delivery(store, job_id, "pacs")
    assert (d["state"], d["attempts"]) == (DeliveryState.DEAD, 3)
    job = store.jobs.get(job_id)
    assert (job["state"], job["failed_stage"]) == (JobState.FAILED, "send")
    assert "pacs" in job["reason"]
    assert sender.run_once() == 0


def test_unconfigured_destination_is_a_dead_letter(tmp_path: Path) -> None:
    settings = _settings(tmp_path, [])
    store = Store(settings.db_path)
    job_id = _encoded_job(store, _outputs(tmp_path / "out", ("sr",)), ["gone"])
    assert Sender(settings, store).run_once() == 1
    assert _delivery(store, job_id, "gone")["state"] == DeliveryState.DEAD
    assert store.jobs.get(job_id)["state"] == JobState.FAILED


@pytest.mark.integration
def test_run_forever_delivers_and_stops(tmp_path: Path) -> None:
    with storescp(tmp_path / "pacs") as peer:
        settings = _settings(tmp_path, [_dest("pacs", peer.port)])
        store = Store(settings.db_path)
        job_id = _encoded_job(store, _outputs(tmp_path / "out", ("sr", "seg")), ["pacs"])
        stop = threading.Event()
        t = threading.Thread(target=Sender(settings, store).run_forever, args=(stop, 0.05))
        t.start()
        try:
            deadline = time.monotonic() + 10
            while store.jobs.get(job_id)["state"] != JobState.DONE:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        finally:
            stop.set()
            t.join(timeout=10)
        assert not t.is_alive()
        assert len(peer.files()) == 2
