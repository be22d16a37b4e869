"""Failure paths of a real `dxgate serve`: refused peers and data, full disk, unreachable destinations, no route.

Every test talks DICOM on loopback to the gateway subprocess (dcmtk and pynetdicom as peers) and checks
what the gateway recorded through its HTTP API and its spool. One gateway serves the tests that can share
it (distinct studies, cloned with fresh UIDs); the full-disk and dead-letter tests need their own settings.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.filereader import read_file_meta_info
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, CTImageStorage, ExplicitVRLittleEndian, generate_uid

from tests.conftest import free_port, require_tool
from tests.integration.conftest import DCMTK_ENV, SR_CLASS, StoreSCP, start_storescp, storescu, wait_for_echo
from tests.integration.gateway import REPO, RunningGateway, start_gateway, write_config

pytestmark = pytest.mark.integration

CHEST_MATCH = {"modality": ["CT"], "body_part": ["CHEST"]}
FAST_SENDER = {"max_attempts": 20, "backoff_initial_s": 0.5, "backoff_max_s": 1.0, "timeout_s": 5}


# -- helpers --------------------------------------------------------------------------------------
def api_call(gw: RunningGateway, path: str, method: str = "GET") -> tuple[int, Any]:
    """(HTTP status, JSON body) of an API call, 4xx/5xx included."""
    req = urllib.request.Request(f"http://127.0.0.1:{gw.http_port}{path}", method=method)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        body = exc.read()
        return exc.code, json.loads(body) if body else None


def wait_for(gw: RunningGateway, what: str, probe: Callable[[], Any], timeout: float = 90.0) -> Any:
    """Poll probe() until it returns something truthy; fail with the gateway log otherwise."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        if gw.proc.poll() is not None:
            raise AssertionError(f"dxgate exited with {gw.proc.returncode} while waiting for {what}:\n"
                                 f"{gw.log()[-4000:]}")
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last})\n{gw.log()[-4000:]}")


def study_jobs(gw: RunningGateway, study_uid: str) -> list[dict]:
    return gw.api(f"/jobs?study_uid={study_uid}&limit=100")


def wait_study_job(gw: RunningGateway, study_uid: str, states: set[str], timeout: float = 120.0) -> dict:
    """The study's one job once it is in one of states, as /jobs/{id} details."""
    def probe() -> dict | None:
        jobs = study_jobs(gw, study_uid)
        return jobs[0] if jobs and jobs[0]["state"] in states else None

    job = wait_for(gw, f"a job of study {study_uid} in {states}", probe, timeout)
    return gw.api(f"/jobs/{job['id']}")


def spooled_sops(gw: RunningGateway) -> set[str]:
    return {p.stem for p in (gw.data_dir / "spool").rglob("*.dcm") if not p.name.startswith(".")}


def received_sops(scp: StoreSCP) -> Counter[str]:
    """How many times the destination received each SOP Instance UID (storescp -uf keeps duplicates)."""
    return Counter(str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
                   for p in scp.out_dir.rglob("*") if p.is_file())


def clone_study(files: list[Path], out: Path, *, limit: int | None = None, **attributes: Any) -> tuple[str, list[Path]]:
    """Copies of a study's files with fresh Study/Series/SOP/Frame of Reference UIDs and given attributes."""
    out.mkdir(parents=True, exist_ok=True)
    study_uid = generate_uid()
    uid_map: dict[str, str] = {}
    written = []
    for src in sorted(files)[:limit]:
        ds = pydicom.dcmread(src)
        ds.StudyInstanceUID = study_uid
        for keyword in ("SeriesInstanceUID", "FrameOfReferenceUID"):
            if keyword in ds:
                setattr(ds, keyword, uid_map.setdefault(str(ds.data_element(keyword).value), generate_uid()))
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        for keyword, value in attributes.items():
            setattr(ds, keyword, value)
        path = out / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        written.append(path)
    return study_uid, written


def c_store_raw(port: int, paths: list[Path], calling_ae: str = "PACS", called_ae: str = "DXGATE") -> list[int | None]:
    """C-STORE files byte for byte with pynetdicom (no decode, so broken data sets go out as they are).

    Returns the response status per file (None when no response came back).
    """
    from pynetdicom import AE, _config

    metas = [read_file_meta_info(p) for p in paths]
    ae = AE(ae_title=calling_ae)
    for sop_class, ts in sorted({(str(m.MediaStorageSOPClassUID), str(m.TransferSyntaxUID)) for m in metas}):
        ae.add_requested_context(sop_class, [ts])
    chunked = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True  # send the file's data set bytes as stored
    try:
        assoc = ae.associate("127.0.0.1", port, ae_title=called_ae)
        assert assoc.is_established, "association to dxgate failed"
        statuses: list[int | None] = []
        for p in paths:
            rsp = assoc.send_c_store(p)
            statuses.append(int(rsp.Status) if "Status" in rsp else None)
        assoc.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = chunked
        ae.shutdown()
    return statuses


def is_failure(status: int | None) -> bool:
    """PS3.4 C.4.2.1.5 / Annex C: refused (A7xx), error (A9xx, Cxxx) or a general failure (01xx)."""
    return status is not None and (status & 0xF000 in (0xA000, 0xC000) or 0x0100 <= status <= 0x01FF)


def garbage_file(path: Path, seed: int = 7) -> str:
    """Preamble + DICM + a valid CT file meta, then random bytes as the "data set"; returns its SOP UID."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    buf = BytesIO()
    buf.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(buf, meta, enforce_standard=True)  # type: ignore[arg-type]
    buf.write(np.random.default_rng(seed).bytes(4096))
    path.write_bytes(buf.getvalue())
    return str(meta.MediaStorageSOPInstanceUID)


def destination(name: str, port: int, ae_title: str | None = None) -> dict[str, Any]:
    return {"name": name, "ae_title": ae_title or name.upper(), "host": "127.0.0.1", "port": port, "overlay": "gsps"}


def assert_each_output_once(scp: StoreSCP, detail: dict) -> None:
    expected = {o["sop_instance_uid"] for o in detail["outputs"]}
    got = received_sops(scp)
    assert expected, detail
    assert expected <= set(got), (expected - set(got), detail["deliveries"])
    duplicates = {uid: n for uid, n in got.items() if uid in expected and n != 1}
    assert not duplicates, f"outputs delivered more than once: {duplicates}"


# -- fixtures -------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def small_chest(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    """A 40-slice 256x256 synthetic chest CT with one nodule (small enough to keep these tests fast)."""
    from training.synthetic import write_chest_ct_study

    return write_chest_ct_study(tmp_path_factory.mktemp("small_chest"), seed=5, slices=40, nodules=1, rows=256)


@dataclass
class SharedGateway:
    gw: RunningGateway
    live: StoreSCP
    flaky_port: int
    tmp: Path


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory, gateway_models: Path) -> Iterator[SharedGateway]:
    """One gateway: calling AEs PACS and PACS2 allowed; PACS studies go to LIVE, PACS2 to LIVE and FLAKY.

    FLAKY's port has no listener until a test starts one.
    """
    tmp = tmp_path_factory.mktemp("shared_gateway")
    live = start_storescp(tmp / "live", "LIVE")
    flaky_port = free_port()
    rules = [
        {"name": "chest-pacs", "match": {**CHEST_MATCH, "calling_ae": ["PACS"]}, "models": ["lung_nodule_ct"],
         "destinations": ["live"]},
        {"name": "chest-pacs2", "match": {**CHEST_MATCH, "calling_ae": ["PACS2"]}, "models": ["lung_nodule_ct"],
         "destinations": ["live", "flaky"]},
    ]
    cfg = write_config(tmp, gateway_models, destinations=[destination("live", live.port),
                                                          destination("flaky", flaky_port)],
                       allowed_calling_aes=["PACS", "PACS2"], rules=rules, sender=FAST_SENDER)
    gw = start_gateway(cfg)
    try:
        yield SharedGateway(gw, live, flaky_port, tmp)
    finally:
        gw.stop()
        live.stop()


# -- tests ----------------------------------------------------------------------------------------
def test_unknown_calling_ae_is_rejected_at_association(shared: SharedGateway, small_chest) -> None:
    gw = shared.gw
    echo = require_tool("echoscu")
    ok = subprocess.run([echo, "-aet", "PACS", "-aec", "DXGATE", "127.0.0.1", str(gw.dicom_port)],
                        env=DCMTK_ENV, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    refused = subprocess.run([echo, "-v", "-aet", "INTRUDER", "-aec", "DXGATE", "127.0.0.1", str(gw.dicom_port)],
                             env=DCMTK_ENV, capture_output=True, text=True)
    assert refused.returncode != 0
    assert "rejected" in (refused.stdout + refused.stderr).lower(), refused.stderr

    study_uid, files = clone_study(small_chest.files, shared.tmp / "intruder", limit=3)
    res = storescu(files[0].parent, gw.dicom_port, "DXGATE", "INTRUDER", check=False)
    assert res.returncode != 0, res.stderr
    status, _ = api_call(gw, f"/studies/{study_uid}")
    assert status == 404
    assert not spooled_sops(gw) & {p.stem for p in files}


def test_broken_data_sets_fail_while_a_concurrent_study_completes(shared: SharedGateway, small_chest) -> None:
    gw = shared.gw
    broken = shared.tmp / "broken"
    broken_study, (slice_file,) = clone_study(small_chest.files, broken, limit=1)
    raw = slice_file.read_bytes()
    truncated = broken / "truncated.dcm"
    truncated.write_bytes(raw[: len(raw) // 2])
    slice_file.unlink()
    garbage_sop = garbage_file(broken / "garbage.dcm")
    truncated_sop = str(read_file_meta_info(truncated).MediaStorageSOPInstanceUID)

    good_study, good_files = clone_study(small_chest.files, shared.tmp / "good")
    sender = subprocess.Popen([require_tool("storescu"), "-aet", "PACS", "-aec", "DXGATE", "--scan-directories",
                               "127.0.0.1", str(gw.dicom_port), str(good_files[0].parent)],
                              env=DCMTK_ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(gw, "the concurrent study's first instance",
                 lambda: api_call(gw, f"/studies/{good_study}")[0] == 200 or sender.poll() is not None, 60)
        statuses = c_store_raw(gw.dicom_port, [truncated, broken / "garbage.dcm"])
        output, _ = sender.communicate(timeout=120)
    finally:
        if sender.poll() is None:
            sender.kill()
    assert sender.returncode == 0, output[-2000:]
    for name, status in zip(("truncated", "garbage"), statuses, strict=True):
        assert is_failure(status), f"{name}: status {status}"
        assert 0xC000 <= status <= 0xCFFF, f"{name}: expected 'cannot understand' (0xCxxx), got 0x{status:04X}"
    assert api_call(gw, f"/studies/{broken_study}")[0] == 404
    assert not spooled_sops(gw) & {garbage_sop, truncated_sop}

    detail = wait_study_job(gw, good_study, {"DONE", "FAILED"}, timeout=180)
    assert detail["state"] == "DONE", detail
    assert len(detail["inputs"]) == len(good_files)
    assert_each_output_once(shared.live, detail)


def test_mr_series_is_unrouted_with_the_reason(shared: SharedGateway, small_chest) -> None:
    gw = shared.gw
    study_uid, files = clone_study(small_chest.files, shared.tmp / "mr", limit=20, Modality="MR",
                                   BodyPartExamined="CHEST")
    storescu(files[0].parent, gw.dicom_port, "DXGATE", "PACS")
    study = wait_for(gw, "the MR study to be routed",
                     lambda: (s := api_call(gw, f"/studies/{study_uid}"))[0] == 200
                     and s[1]["state"] in ("ROUTED", "UNROUTED") and s[1])
    assert study["state"] == "UNROUTED", study
    assert "modality MR" in (study["reason"] or ""), study["reason"]
    assert study["jobs"] == [] and study_jobs(gw, study_uid) == []
    assert [s["modality"] for s in study["series"]] == ["MR"]


def test_destination_down_then_up_never_blocks_the_live_one(shared: SharedGateway, small_chest) -> None:
    gw = shared.gw
    study_uid, files = clone_study(small_chest.files, shared.tmp / "two_destinations")
    storescu(files[0].parent, gw.dicom_port, "DXGATE", "PACS2")

    def live_sent_flaky_failing() -> dict | None:
        jobs = study_jobs(gw, study_uid)
        if not jobs:
            return None
        detail = gw.api(f"/jobs/{jobs[0]['id']}")
        by_dest = {d["destination"]: d for d in detail["deliveries"]}
        if by_dest.get("live", {}).get("state") == "SENT" and by_dest.get("flaky", {}).get("attempts", 0) >= 1:
            return detail
        return None

    detail = wait_for(gw, "LIVE delivered while FLAKY fails", live_sent_flaky_failing, timeout=180)
    flaky = next(d for d in detail["deliveries"] if d["destination"] == "flaky")
    assert flaky["state"] == "PENDING", flaky  # far from its 20 attempts: still retrying
    assert flaky["attempts"] < FAST_SENDER["max_attempts"] // 2, flaky
    assert flaky["last_error"], flaky
    assert detail["state"] == "SENDING", detail
    assert_each_output_once(shared.live, detail)  # LIVE got everything without waiting for FLAKY

    flaky_scp = start_storescp(shared.tmp / "flaky", "FLAKY", port=shared.flaky_port)
    try:
        done = wait_study_job(gw, study_uid, {"DONE", "FAILED"}, timeout=60)
    finally:
        flaky_scp.stop()
    assert done["state"] == "DONE", done
    assert all(d["state"] == "SENT" for d in done["deliveries"]), done["deliveries"]
    assert next(d for d in done["deliveries"] if d["destination"] == "flaky")["attempts"] >= 2
    assert_each_output_once(flaky_scp, done)
    assert_each_output_once(shared.live, done)
    assert any(ds.SOPClassUID == SR_CLASS and ds.StudyInstanceUID == study_uid for ds in flaky_scp.datasets())


def _start_unready_gateway(config: Path, timeout: float = 90.0) -> RunningGateway:
    """`dxgate serve` that is expected to report not-ready: wait for /healthz and a C-ECHO answer instead."""
    import yaml

    cfg = yaml.safe_load(config.read_text())
    log_path = config.parent / "dxgate-unready.log"
    proc = subprocess.Popen([sys.executable, "-m", "dxgate", "serve", "--config", str(config)],
                            cwd=REPO, stdout=log_path.open("wb"), stderr=subprocess.STDOUT)
    gw = RunningGateway(proc, config, Path(cfg["data_dir"]), cfg["dicom_port"], cfg["http_port"], log_path)
    try:
        wait_for(gw, "/healthz", lambda: api_call(gw, "/healthz")[0] == 200 if _port_open(gw.http_port) else None,
                 timeout)
        wait_for_echo(gw.dicom_port, "DXGATE")
    except BaseException:
        gw.stop()
        raise
    return gw


def _port_open(port: int) -> bool:
    import socket

    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_full_disk_answers_out_of_resources(tmp_path: Path, gateway_models: Path, small_chest) -> None:
    (tmp_path / "var").mkdir()
    free_mb = shutil.disk_usage(tmp_path / "var").free // (1024 * 1024)
    cfg = write_config(tmp_path, gateway_models, min_free_disk_mb=int(free_mb) + 1_000_000)
    gw = _start_unready_gateway(cfg)
    try:
        status, body = api_call(gw, "/readyz")
        assert status == 503, body
        assert body["checks"]["disk"] is False, body
        assert body["ready"] is False
        study_uid, files = clone_study(small_chest.files, tmp_path / "study", limit=2)
        assert c_store_raw(gw.dicom_port, files) == [0xA700, 0xA700]
        res = storescu(files[0], gw.dicom_port, "DXGATE", "PACS", check=False)
        assert "0xa700" in (res.stdout + res.stderr).lower() or res.returncode != 0, res.stderr
        assert api_call(gw, f"/studies/{study_uid}")[0] == 404
        assert gw.api("/jobs") == []
        assert not spooled_sops(gw)
    finally:
        gw.stop()


def test_dead_letter_then_cli_replay_delivers(tmp_path: Path, gateway_models: Path, small_chest) -> None:
    port = free_port()  # nothing listens here until the replay
    sender = {"max_attempts": 2, "backoff_initial_s": 0.5, "backoff_max_s": 1.0, "timeout_s": 5}
    cfg = write_config(tmp_path, gateway_models, destinations=[destination("pacs", port, "DEST")], sender=sender)
    gw = start_gateway(cfg)
    dest: StoreSCP | None = None
    try:
        storescu(small_chest.files[0].parent, gw.dicom_port, "DXGATE")
        failed = wait_study_job(gw, small_chest.study_uid, {"FAILED", "DONE"}, timeout=180)
        assert failed["state"] == "FAILED", failed
        assert failed["failed_stage"] == "send", failed
        (delivery,) = failed["deliveries"]
        assert delivery["state"] == "DEAD" and delivery["attempts"] == 2 and delivery["last_error"], delivery
        assert failed["outputs"], failed

        dest = start_storescp(tmp_path / "dest", "DEST", port=port)
        res = subprocess.run([sys.executable, "-m", "dxgate", "jobs", "--config", str(cfg), "replay",
                              str(failed["id"])], cwd=REPO, capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        assert "SENDING" in res.stdout, res.stdout
        done = wait_study_job(gw, small_chest.study_uid, {"DONE", "FAILED"}, timeout=60)
        assert done["state"] == "DONE", done
        assert done["id"] == failed["id"] and done["deliveries"][0]["state"] == "SENT"
        assert any("replay" in (e["detail"] or "") for e in done["events"]), done["events"]
        assert len(gw.api("/jobs")) == 1  # a resend, not a new job
        assert_each_output_once(dest, done)
    finally:
        gw.stop()
        if dest is not None:
            dest.stop()
