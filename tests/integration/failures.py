"""Helpers of the failure-path tests: API calls and polling, study clones, raw C-STOREs, broken files.

The tests (`test_failure_paths.py`) talk DICOM on loopback to a `dxgate serve` subprocess and check what
the gateway recorded through its HTTP API and its spool, and what a dcmtk destination received.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.filereader import read_file_meta_info
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, CTImageStorage, ExplicitVRLittleEndian, generate_uid

from harness.dcmtk import StoreSCP
from harness.gateway import RunningGateway, api_request


def api_call(gw: RunningGateway, path: str, method: str = "GET") -> tuple[int, Any]:
    """(HTTP status, JSON body) of an API call, 4xx/5xx included."""
    req = api_request(gw.http_port, path, gw.token, method=method)
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
    return Counter(str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in scp.files())


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
