"""What every hostile case checks: the status or failure reason, nothing acknowledged lost, a live server."""

from __future__ import annotations

import re
import sqlite3
import time
import urllib.error
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from harness.ct import make_ct
from harness.dcmtk import run_echoscu
from harness.gateway import RunningGateway
from harness.hostile import CT_IMAGE_STORAGE, RawPeer, encode_dataset

# PHI canaries: every hostile data set and the valid study carry them; no log, row or API body may.
CANARY_NAME = "Canarywood^Zebediah"
CANARY_BIRTH_DATE = "19230417"
CANARY_PATIENT_ID = "ZQX7731CANARY"
CANARY_NEEDLES = ("Canarywood", "Zebediah", CANARY_BIRTH_DATE, "1923-04-17", CANARY_PATIENT_ID)

SUCCESS, OUT_OF_RESOURCES, CANNOT_UNDERSTAND, MISSING_IDENTIFIER = 0x0000, 0xA700, 0xC210, 0xC211


def with_canaries(ds: Dataset) -> Dataset:
    ds.PatientName, ds.PatientBirthDate, ds.PatientID = CANARY_NAME, CANARY_BIRTH_DATE, CANARY_PATIENT_ID
    return ds


def ct(**kwargs: object) -> Dataset:
    """One small CT slice (harness.ct.make_ct) with the PHI canaries."""
    return with_canaries(make_ct(**kwargs))  # type: ignore[arg-type]


@dataclass
class Series:
    """An in-memory series of one new study."""

    study_uid: str
    series_uid: str
    datasets: list[Dataset]

    @property
    def sop_uids(self) -> list[str]:
        return [str(d.SOPInstanceUID) for d in self.datasets]


def ct_series(n: int = 16, rows: int = 32, slice_mm: float = 1.0, **kwargs: object) -> Series:
    """`n` contiguous chest CT slices (enough for the lung model's 16-slice minimum), with canaries."""
    study, series = generate_uid(), generate_uid()
    datasets = [ct(study_uid=study, series_uid=series, instance_number=i, rows=rows, columns=rows,
                   slice_thickness=slice_mm, **kwargs) for i in range(1, n + 1)]
    return Series(study, series, datasets)


def mr_pixels(rows: int) -> np.ndarray:
    """Stored values of an MR-like slice (0..~600, no air at -1000 HU, no bone) for 'MR labelled CT'."""
    rng = np.random.default_rng(rows)
    return (rng.normal(300, 80, (rows, rows)).clip(0, 700) + 1024).astype(np.int32)


# -- sending ------------------------------------------------------------------------------------------
def open_peer(gw: RunningGateway, calling_ae: str = "HOSTILE", transfer_syntax: str = ExplicitVRLittleEndian,
              sop_class: str = CT_IMAGE_STORAGE) -> tuple[RawPeer, int]:
    """A raw association to the gateway; (peer, context ID) or an AssertionError saying why not."""
    peer = RawPeer(gw.dicom_port)
    got = peer.associate(gw.ae_title, calling_ae, ((sop_class, (transfer_syntax,)),))
    if not got.ok:
        peer.close()
        raise AssertionError(f"association refused: {got}")
    return peer, got.accepted[sop_class]


def store_raw(gw: RunningGateway, sop_uid: str, data: bytes, *, transfer_syntax: str = ExplicitVRLittleEndian,
              sop_class: str = CT_IMAGE_STORAGE, calling_ae: str = "HOSTILE",
              timeout_s: float = 60.0) -> int | None:
    """C-STORE raw data set bytes over a fresh raw association; the status (None: association ended)."""
    peer, cx = open_peer(gw, calling_ae, transfer_syntax, sop_class)
    with peer:
        status = peer.c_store(cx, sop_class, sop_uid, data, timeout_s=timeout_s)
        if status is not None:
            peer.release()
        return status


def store_datasets(gw: RunningGateway, datasets: Sequence[Dataset], calling_ae: str = "HOSTILE",
                   transfer_syntax: str = ExplicitVRLittleEndian) -> list[int | None]:
    """C-STORE data sets over one raw association (explicit VR LE data sets); their statuses."""
    peer, cx = open_peer(gw, calling_ae, transfer_syntax)
    with peer:
        out = [peer.c_store(cx, str(ds.SOPClassUID), str(ds.SOPInstanceUID), encode_dataset(ds))
               for ds in datasets]
        peer.release()
    return out


# -- what every case asserts --------------------------------------------------------------------------
def assert_alive(gw: RunningGateway) -> None:
    """The process runs, /healthz answers and the SCP answers C-ECHO."""
    assert gw.proc.poll() is None, f"dxgate exited with {gw.proc.returncode}:\n{gw.log()[-3000:]}"
    assert gw.api("/healthz") is not None
    res = run_echoscu(gw.dicom_port, gw.ae_title, timeout_s=10)
    assert res.returncode == 0, f"C-ECHO failed: {res.stderr[-1000:]}"


def db(gw: RunningGateway) -> sqlite3.Connection:
    """The gateway's job store, read-only."""
    conn = sqlite3.connect(f"file:{gw.data_dir / 'jobs.sqlite3'}?mode=ro", uri=True, timeout=10)
    conn.row_factory = sqlite3.Row
    return conn


def stored(gw: RunningGateway, sop_uids: Sequence[str]) -> dict[str, Path]:
    """Those of `sop_uids` the store has a row for, with their spool paths."""
    with db(gw) as conn:
        rows = conn.execute(f"SELECT sop_instance_uid, path FROM instances WHERE sop_instance_uid IN "
                            f"({','.join('?' * len(sop_uids))})", list(sop_uids)).fetchall()
    return {r["sop_instance_uid"]: Path(r["path"]) for r in rows}


def assert_kept(gw: RunningGateway, sop_uids: Sequence[str], study_uid: str | None = None) -> None:
    """Every acknowledged instance has its row and its spool file (and counts in GET /studies/{uid})."""
    have = stored(gw, sop_uids)
    missing = set(sop_uids) - set(have)
    assert not missing, f"acknowledged but not stored: {sorted(missing)[:5]}"
    gone = [u for u, p in have.items() if not p.exists()]
    assert not gone, f"acknowledged but no spool file: {gone[:5]}"
    if study_uid is not None:
        study = gw.api(f"/studies/{study_uid}")
        assert sum(s["n_instances"] for s in study["series"]) >= len(set(sop_uids))


def assert_not_stored(gw: RunningGateway, sop_uids: Sequence[str]) -> None:
    """A refused instance left no row (so nothing half-received is processed)."""
    assert not stored(gw, sop_uids)


def study_or_none(gw: RunningGateway, study_uid: str) -> dict | None:
    try:
        return gw.api(f"/studies/{study_uid}")
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return None
        raise


def wait_outcome(gw: RunningGateway, study_uid: str, timeout_s: float = 180.0) -> dict:
    """Wait until the study has a job in DONE/FAILED, or was routed nowhere; the study body (jobs in it)."""
    deadline = time.monotonic() + timeout_s
    study: dict | None = None
    while time.monotonic() < deadline:
        study = study_or_none(gw, study_uid)
        if study is not None:
            if any(j["state"] in ("DONE", "FAILED") for j in study["jobs"]):
                return study
            if study["state"] == "UNROUTED":
                return study
        assert gw.proc.poll() is None, gw.log()[-3000:]
        time.sleep(0.5)
    raise AssertionError(f"study {study_uid} has no outcome in {timeout_s}s: {study}")


def assert_failed(gw: RunningGateway, series: Series, pattern: str, stages: Sequence[str] = ("load",),
                  timeout_s: float = 180.0, transfer_syntax: str = ExplicitVRLittleEndian) -> dict:
    """The series was acknowledged and kept, and its job ended FAILED at `stages` with a matching reason."""
    statuses = store_datasets(gw, series.datasets, transfer_syntax=transfer_syntax)
    assert statuses == [SUCCESS] * len(series.datasets), statuses
    assert_kept(gw, series.sop_uids, series.study_uid)
    study = wait_outcome(gw, series.study_uid, timeout_s)
    failed = [j for j in study["jobs"] if j["state"] == "FAILED"]
    assert failed, f"no FAILED job: state {study['state']}, reason {study['reason']!r}, jobs {study['jobs']}"
    job = failed[0]
    assert job["failed_stage"] in stages, (job["failed_stage"], job["reason"])
    assert re.search(pattern, job["reason"] or "", re.IGNORECASE), job["reason"]
    assert_alive(gw)
    return job
