"""Hostile data sets in well-formed C-STOREs: bombs, lying lengths, bad identifiers, duplicates."""

from __future__ import annotations

import hashlib
import os

import pytest
from pydicom.uid import generate_uid

from harness.gateway import RunningGateway
from harness.hostile import CT_IMAGE_STORAGE, DEFLATED_EXPLICIT_LE, encode_dataset, uid_value
from harness.payloads import deflate_bomb, element, nested_sequences
from tests.hostile.support import (
    CANARY_BIRTH_DATE,
    CANARY_NAME,
    CANNOT_UNDERSTAND,
    MISSING_IDENTIFIER,
    OUT_OF_RESOURCES,
    SUCCESS,
    assert_alive,
    assert_kept,
    assert_not_stored,
    ct,
    store_raw,
    stored,
)
from tests.hostile.test_association import rss_mb

pytestmark = pytest.mark.integration

LIMIT_BYTES = 32 * 1024 * 1024  # the suite's limits.max_dataset_mb


def patient(name: str = CANARY_NAME, birth: str = CANARY_BIRTH_DATE) -> bytes:
    """Patient's Name and Birth Date (0010,0010), (0010,0030) as raw elements (the PHI canaries)."""
    raw = name.encode() + (b" " if len(name) % 2 else b"")
    return element(0x0010, 0x0010, "PN", raw) + element(0x0010, 0x0030, "DA", birth.encode())


def header(sop: str, study: str | None = "", series: str = "") -> bytes:
    """A CT image's identifiers and patient (tag order) as raw elements: any UID value, or no study UID."""
    study = generate_uid() if study == "" else study
    out = (element(0x0008, 0x0016, "UI", uid_value(CT_IMAGE_STORAGE)) + element(0x0008, 0x0018, "UI", uid_value(sop))
           + element(0x0008, 0x0060, "CS", b"CT") + patient())
    if study is not None:
        out += element(0x0020, 0x000D, "UI", uid_value(study))
    return out + element(0x0020, 0x000E, "UI", uid_value(series or generate_uid()))


def test_deflated_data_set_inflating_to_10_gb(gw: RunningGateway) -> None:
    sop = generate_uid()
    bomb = deflate_bomb(header(sop), 10 * 1024**3)
    assert len(bomb) < 16 * 1024 * 1024  # ~10 MB on the wire
    before = rss_mb(gw.pid)
    status = store_raw(gw, sop, bomb, transfer_syntax=DEFLATED_EXPLICIT_LE, timeout_s=120)
    assert status == OUT_OF_RESOURCES, status
    assert rss_mb(gw.pid) - before < 2 * LIMIT_BYTES / 2**20 + 200  # the inflate stopped at the limit
    assert_not_stored(gw, [sop])
    assert_alive(gw)


def test_data_set_over_max_dataset_mb(gw: RunningGateway) -> None:
    sop = generate_uid()
    big = header(sop) + element(0x0011, 0x0010, "LO", b"HOSTILE ") + element(0x0011, 0x1000, "OB",
                                                                              bytes(LIMIT_BYTES + 1024))
    assert store_raw(gw, sop, big, timeout_s=120) == OUT_OF_RESOURCES
    assert_not_stored(gw, [sop])
    assert_alive(gw)


def test_declared_length_far_beyond_what_is_sent(gw: RunningGateway) -> None:
    sop = generate_uid()
    lying = header(sop) + element(0x7FE0, 0x0010, "OB", os.urandom(64), length=16 * 1024 * 1024)
    assert store_raw(gw, sop, lying) == CANNOT_UNDERSTAND
    assert_not_stored(gw, [sop])
    assert_alive(gw)


def test_garbage_data_set(gw: RunningGateway) -> None:
    sop = generate_uid()
    assert store_raw(gw, sop, os.urandom(4096)) == CANNOT_UNDERSTAND
    assert_not_stored(gw, [sop])
    assert_alive(gw)


BAD_UIDS = {"dot-dot-slash": "../x", "slash": "1.2/3", "newline": "1.2.3\n", "65-characters": "1." + "2" * 63,
            "nul": "1.2\x003.4"}


@pytest.mark.parametrize("uid", list(BAD_UIDS.values()), ids=list(BAD_UIDS))
def test_bad_study_instance_uid(gw: RunningGateway, uid: str) -> None:
    sop = generate_uid()
    assert store_raw(gw, sop, header(sop, study=uid)) == CANNOT_UNDERSTAND
    assert_not_stored(gw, [sop])
    assert not (gw.data_dir / "x").exists() and not (gw.data_dir.parent / "x").exists()
    assert_alive(gw)


@pytest.mark.parametrize("uid", ["../x", "1.2/3", "1.2.3\n", "1.2\x003.4"],
                         ids=["dot-dot-slash", "slash", "newline", "nul"])
def test_bad_sop_instance_uid_in_command_and_data_set(gw: RunningGateway, uid: str) -> None:
    assert store_raw(gw, uid, header(uid)) == CANNOT_UNDERSTAND
    assert_not_stored(gw, [uid, uid.strip()])
    assert not (gw.data_dir / "x").exists() and not (gw.data_dir.parent / "x").exists()
    assert_alive(gw)


def test_path_traversal_in_series_uid(gw: RunningGateway) -> None:
    sop = generate_uid()
    assert store_raw(gw, sop, header(sop, series="../../x")) == CANNOT_UNDERSTAND
    assert_not_stored(gw, [sop])
    assert not (gw.data_dir / "x").exists() and not (gw.data_dir.parent / "x").exists()
    assert_alive(gw)


def test_no_study_instance_uid(gw: RunningGateway) -> None:
    sop = generate_uid()
    assert store_raw(gw, sop, header(sop, study=None)) == MISSING_IDENTIFIER
    assert_not_stored(gw, [sop])
    assert_alive(gw)


def test_sop_instance_uid_differs_between_command_and_data_set(gw: RunningGateway) -> None:
    in_command, in_data = generate_uid(), generate_uid()
    assert store_raw(gw, in_command, header(in_data)) == CANNOT_UNDERSTAND
    assert_not_stored(gw, [in_command, in_data])
    assert_alive(gw)


def test_10000_nested_sequences(gw: RunningGateway) -> None:
    sop = generate_uid()
    assert store_raw(gw, sop, header(sop) + nested_sequences(10_000)) == CANNOT_UNDERSTAND
    assert_not_stored(gw, [sop])
    assert_alive(gw)


def test_same_sop_instance_uid_different_content_is_a_conflict(gw: RunningGateway) -> None:
    first = ct(seed=1)
    sop, study = str(first.SOPInstanceUID), str(first.StudyInstanceUID)
    second = ct(seed=2, study_uid=study, series_uid=str(first.SeriesInstanceUID), sop_uid=sop)
    a, b = encode_dataset(first), encode_dataset(second)
    assert a != b
    assert store_raw(gw, sop, a) == SUCCESS
    assert_kept(gw, [sop], study)
    path = stored(gw, [sop])[sop]
    kept = hashlib.sha256(path.read_bytes()).hexdigest()
    assert store_raw(gw, sop, b) == SUCCESS
    assert hashlib.sha256(path.read_bytes()).hexdigest() == kept  # the first stays the instance
    conflicts = gw.api(f"/conflicts?study_uid={study}")
    rows = conflicts if isinstance(conflicts, list) else conflicts.get("conflicts", [])
    assert [c for c in rows if c.get("sop_instance_uid") == sop], conflicts
    assert_alive(gw)


def test_same_sop_instance_uid_same_content_is_no_conflict(gw: RunningGateway) -> None:
    ds = ct()
    sop, study = str(ds.SOPInstanceUID), str(ds.StudyInstanceUID)
    data = encode_dataset(ds)
    assert store_raw(gw, sop, data) == SUCCESS
    assert store_raw(gw, sop, data) == SUCCESS
    assert_kept(gw, [sop], study)
    conflicts = gw.api(f"/conflicts?study_uid={study}")
    rows = conflicts if isinstance(conflicts, list) else conflicts.get("conflicts", [])
    assert not [c for c in rows if c.get("sop_instance_uid") == sop], conflicts
    assert_alive(gw)

