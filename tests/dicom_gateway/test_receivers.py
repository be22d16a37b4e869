"""`receivers: 2`: two Storage SCP processes on one port (SO_REUSEPORT), restarted when killed."""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from harness.ct import write_ct_series
from harness.dcmtk import run_storescu
from harness.gateway import REPO, RunningGateway, start_gateway, write_config
from harness.system import system_tool

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SO_REUSEPORT receivers: Linux")]


@pytest.fixture(scope="module")
def models_dir(request: pytest.FixtureRequest) -> Path:
    """The shipped models/ when one is installed (readiness needs a model), else a smoke model."""
    if any((REPO / "models").glob("*/metadata.json")):
        return REPO / "models"
    return request.getfixturevalue("smoke_models_dir")


def receiver_pids(gw: RunningGateway) -> list[int]:
    """Pids of receivers that logged their start, in order."""
    pids = []
    for line in gw.log().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("msg") == "receiver started":
            pids.append(int(rec["reason"].split()[1]))
    return pids


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def wait_for(cond, timeout: float, what: str, gw: RunningGateway) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not within {timeout}s:\n{gw.log()[-3000:]}")
        time.sleep(0.1)


def recorded(data_dir: Path) -> list[str]:
    with sqlite3.connect(data_dir / "jobs.sqlite3") as db:
        return [r[0] for r in db.execute("SELECT sop_instance_uid FROM instances")]


def open_associations(data_dir: Path) -> int:
    with sqlite3.connect(data_dir / "jobs.sqlite3") as db:
        return int(db.execute("SELECT COUNT(*) FROM associations WHERE closed_at IS NULL").fetchone()[0])


def sop_uids(files: list[Path]) -> set[str]:
    import pydicom

    return {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}


def test_two_receivers_share_the_port_and_restart(tmp_path: Path, models_dir: Path) -> None:
    system_tool("storescu")
    studies = [write_ct_series(tmp_path / f"study{i}", n=5, rows=64, columns=64) for i in range(4)]
    gw = start_gateway(write_config(tmp_path, models_dir, receivers=2, quiet_seconds=60.0))
    try:
        wait_for(lambda: len(receiver_pids(gw)) == 2, 10, "two receivers", gw)
        first = receiver_pids(gw)
        assert all(alive(p) for p in first)

        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(lambda files: run_storescu(files, gw.dicom_port, "DXGATE"), studies))
        for res in results:
            assert res.returncode == 0, res.stderr
        expected = set().union(*(sop_uids(files) for files in studies))
        got = recorded(gw.data_dir)
        assert sorted(got) == sorted(expected)  # every instance exactly once
        assert len(list((gw.data_dir / "spool").rglob("*.dcm"))) == len(expected)

        os.kill(first[0], signal.SIGKILL)
        wait_for(lambda: len(receiver_pids(gw)) == 3, 15, "a restarted receiver", gw)
        assert "restarting it" in gw.log()
        wait_for(lambda: gw.api("/readyz")["ready"], 10, "readiness after the restart", gw)
        assert alive(first[1]) and alive(receiver_pids(gw)[2])

        late = write_ct_series(tmp_path / "late", n=3, rows=64, columns=64)
        for _ in range(2):  # two associations: the kernel may hash each to either receiver
            res = run_storescu(late, gw.dicom_port, "DXGATE")
            assert res.returncode == 0, res.stderr
        assert set(recorded(gw.data_dir)) == expected | sop_uids(late)
        wait_for(lambda: open_associations(gw.data_dir) == 0, 5, "all associations closed", gw)

        # The parent SIGKILLed: its receivers must not live on holding the port.
        gw.kill()
        pids = receiver_pids(gw)[1:]
        # 30 s: a stopping receiver ends within SHUTDOWN_GRACE_S (15 s) whatever it waits on; the rest is
        # slack for a loaded 2-core CI run
        wait_for(lambda: not any(alive(p) for p in pids), 30,
                 f"receivers {pids} ending with their parent", gw)
        with pytest.raises(ConnectionRefusedError):  # nobody listens any more
            socket.create_connection(("127.0.0.1", gw.dicom_port), timeout=2).close()
    finally:
        gw.stop()


def test_sigterm_stops_the_receivers(tmp_path: Path, models_dir: Path) -> None:
    gw = start_gateway(write_config(tmp_path, models_dir, receivers=2, quiet_seconds=60.0))
    try:
        wait_for(lambda: len(receiver_pids(gw)) == 2, 10, "two receivers", gw)
        pids = receiver_pids(gw)
        gw.stop()  # SIGTERM to the gateway only
        wait_for(lambda: not any(alive(p) for p in pids), 10, "receivers ending with the gateway", gw)
        assert gw.log().count("receiver stopped") == 2  # a clean stop, not killed
    finally:
        gw.stop()


def test_a_port_taken_by_another_program_refuses_start(tmp_path: Path) -> None:
    from dicom_gateway.errors import GatewayError
    from dicom_gateway.receive.receivers import ReceiverPool
    from dicom_gateway.settings import Settings
    from dicom_gateway.store import Store

    with socket.socket() as other:  # a listener without SO_REUSEPORT owns the port
        other.bind(("127.0.0.1", 0))
        other.listen()
        settings = Settings(dicom_port=other.getsockname()[1], data_dir=tmp_path / "var", receivers=2,
                            log_format="text")
        pool = ReceiverPool(settings, Store(settings.db_path))
        with pytest.raises(GatewayError, match="did not start"):
            pool.start(timeout=30)
        assert not pool.alive()


SIGNAL_FLOOD = """
import os, signal, subprocess, sys
from dicom_gateway.receive.receivers import StopRequest

stop = StopRequest()
stop.install(signal.SIGUSR1)
n = int(sys.argv[1])
sender = subprocess.Popen(["bash", "-c", f"for i in $(seq {n}); do kill -USR1 {os.getpid()} || exit 1; done"])
while sender.poll() is None:
    stop.sleep(0.0002)  # the loop spends its time where a signal can land
print(len(stop._signals), bool(stop), sender.returncode)
"""


def test_stop_request_survives_a_flood_of_signals(tmp_path: Path) -> None:
    """The receiver's SIGTERM handler must take no lock: with `threading.Event.set()` as the handler and
    `Event.wait()` in the loop, a process like this one deadlocks within a few hundred signals."""
    import subprocess

    script = tmp_path / "flood.py"
    script.write_text(SIGNAL_FLOOD)
    try:
        res = subprocess.run([sys.executable, str(script), "2000"], cwd=REPO, capture_output=True, text=True,
                             timeout=30, env={**os.environ, "PYTHONPATH": str(REPO)})
    except subprocess.TimeoutExpired as exc:
        raise AssertionError("the loop deadlocked under signals") from exc
    assert res.returncode == 0, res.stderr
    received, requested, sender_rc = res.stdout.split()
    assert sender_rc == "0" and requested == "True"
    assert 1 <= int(received) <= 2000  # Linux merges a pending signal with one already queued


HANGING_STOP = """
import multiprocessing as mp, os, signal, sys, threading, time
from dicom_gateway.receive import receivers, scp
from dicom_gateway.settings import Settings

receivers.SHUTDOWN_GRACE_S = 1.0
scp.StorageSCP.stop = lambda self: time.sleep(3600)  # a stop that never returns
settings = Settings(data_dir=sys.argv[1], dicom_port=int(sys.argv[2]))
ctx = mp.get_context("spawn")
ready = ctx.Event()
threading.Thread(target=lambda: ready.wait(30) and os.kill(os.getpid(), signal.SIGTERM), daemon=True).start()
receivers.run_receiver(settings.model_dump_json(), ctx.Event(), ready)
print("returned")
"""


def test_a_receiver_whose_stop_hangs_still_ends(tmp_path: Path) -> None:
    """Past SHUTDOWN_GRACE_S a stopping receiver dumps its threads' stacks to the log and exits."""
    import subprocess

    from harness.system import free_port

    script = tmp_path / "hang.py"
    script.write_text(HANGING_STOP)
    started = time.monotonic()
    res = subprocess.run([sys.executable, str(script), str(tmp_path / "var"), str(free_port())], cwd=REPO,
                         capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert res.returncode == 1, (res.stdout, res.stderr)
    assert "returned" not in res.stdout
    assert "Timeout (0:00:01)" in res.stderr and "run_receiver" in res.stderr  # where it hung, in the log
    assert time.monotonic() - started < 30
