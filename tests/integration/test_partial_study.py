"""A partial study is not a study: dcmtk storescu aborts half-way at a non-DICOM file (annotations.csv).

A real `dxgate serve`; the sender is dcmtk storescu, which halts at the first file it cannot read and
aborts the association (PS3.8 7.3). The aborted study waits abort_grace_seconds for the sender's retry,
a released one does not; a series still incomplete when the grace is over is never given to a model
("incomplete series: ..."), and the retry of the whole series is processed as a new epoch.
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest

from harness.ct import write_ct_series
from harness.dcmtk import run_storescu, storescu
from harness.gateway import RunningGateway, start_gateway, write_config

pytestmark = [pytest.mark.integration]

SLICES = 24
QUIET_S = 0.5
GRACE_S = 6.0
JOB_STATES = {"QUEUED", "RUNNING", "DONE", "FAILED"}


@pytest.fixture
def gateway(tmp_path: Path, gateway_models: Path) -> Iterator[RunningGateway]:
    cfg = write_config(tmp_path / "gw", gateway_models, quiet_seconds=QUIET_S, abort_grace_seconds=GRACE_S)
    gw = start_gateway(cfg)
    yield gw
    gw.stop()


def _study(folder: Path, images_in_acquisition: bool = False) -> tuple[str, list[Path], Path]:
    """(StudyInstanceUID, the chest CT slices in slice order, an annotations.csv in a sub-folder)."""
    files = write_ct_series(folder, SLICES, rows=32, columns=32)
    if images_in_acquisition:
        for f in files:
            ds = pydicom.dcmread(f)
            ds.ImagesInAcquisition = SLICES  # (0020,1002), as many scanners send it
            ds.save_as(f, enforce_file_format=True)
    csv = folder / "truth" / "annotations.csv"
    csv.parent.mkdir()
    csv.write_text("seriesuid,coordX,coordY,coordZ,diameter_mm\n")
    return str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID), files, csv


def _send_until_the_csv(gw: RunningGateway, order: list[Path], csv: Path) -> tuple[list[Path], float]:
    """Half the files, the csv (storescu halts and aborts there), the rest; (acknowledged files, end time)."""
    half = len(order) // 2
    res = run_storescu([*order[:half], csv, *order[half:]], gw.dicom_port, gw.ae_title, calling_ae="PACS",
                       verbose=True)
    end = time.time()
    log = res.stdout + res.stderr
    assert "Aborting Association" in log, log[-2000:]
    acked, current = [], None
    for line in log.splitlines():
        if m := re.search(r"Sending file: (.+)$", line):
            current = Path(m.group(1).strip())
        elif "Received Store Response (Success)" in line and current is not None:
            acked.append(current)
    assert acked == order[:half], log[-2000:]
    return acked, end


def _wait_study(gw: RunningGateway, uid: str, states: set[str], timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        study = gw.api(f"/studies/{uid}")
        if study["state"] in states:
            return study
        time.sleep(0.2)
    raise AssertionError(f"study not {states} in {timeout}s: {study}\n{gw.log()[-3000:]}")


def test_an_aborted_send_is_not_a_study_until_the_retry(tmp_path: Path, gateway: RunningGateway) -> None:
    gw = gateway
    # Sent in a scattered order (as a directory scan does), cut short: holes in the slice grid.
    scattered_uid, scattered, scattered_csv = _study(tmp_path / "scattered")
    order = random.Random(7).sample(scattered, len(scattered))
    # Sent in slice order, cut short: a regular grid, but fewer images than Images in Acquisition.
    counted_uid, counted, counted_csv = _study(tmp_path / "counted", images_in_acquisition=True)
    # Sent whole and released.
    released_uid, released, _ = _study(tmp_path / "released")

    acked, aborted_at = _send_until_the_csv(gw, order, scattered_csv)
    counted_acked, counted_aborted_at = _send_until_the_csv(gw, counted, counted_csv)
    storescu(released, gw.dicom_port, gw.ae_title)
    released_at = time.time()

    # Quiet for several quiet times, but within the grace: the aborted studies are still receiving.
    time.sleep(QUIET_S * 4)
    assert gw.api(f"/studies/{scattered_uid}")["state"] == "RECEIVING"
    assert gw.api(f"/studies/{counted_uid}")["state"] == "RECEIVING"
    study = _wait_study(gw, released_uid, {"ROUTED", "UNROUTED"})
    assert study["state"] == "ROUTED", study
    assert study["ready_at"] - released_at < GRACE_S  # a released study waits the quiet time only

    # The grace is over and no retry came: judged, and the incomplete series go to no model.
    positions = sorted(scattered.index(f) for f in acked)
    missing = positions[-1] - positions[0] + 1 - len(positions)
    assert missing > 0
    study = _wait_study(gw, scattered_uid, {"ROUTED", "UNROUTED"}, timeout=GRACE_S + 30)
    assert study["ready_at"] - aborted_at >= GRACE_S - 0.5
    assert study["state"] == "UNROUTED" and study["jobs"] == [], study
    assert study["reason"].startswith(f"incomplete series: gap in slice positions ({missing} missing)"), study
    study = _wait_study(gw, counted_uid, {"ROUTED", "UNROUTED"}, timeout=GRACE_S + 30)
    assert study["ready_at"] - counted_aborted_at >= GRACE_S - 0.5
    assert study["state"] == "UNROUTED" and study["jobs"] == [], study
    assert study["reason"].startswith(f"incomplete series: {len(counted_acked)} of {SLICES} images"), study
    assert [(s["completeness"], s["completeness_reason"]) for s in study["series"]] == [
        ("incomplete", f"incomplete series: {len(counted_acked)} of {SLICES} images")], study["series"]

    # The sender's retry of the whole folder (the csv is not *.dcm): a new epoch, a job on every slice.
    storescu(tmp_path / "scattered", gw.dicom_port, gw.ae_title)
    study = _wait_study(gw, scattered_uid, {"ROUTED", "UNROUTED"})
    assert (study["state"], study["epoch"]) == ("ROUTED", 2), study
    (job,) = study["jobs"]
    detail = gw.api(f"/jobs/{job['id']}")
    assert detail["state"] in JOB_STATES and detail["study_epoch"] == 2
    assert len(detail["inputs"]) == SLICES
    assert gw.api(f"/studies/{counted_uid}")["jobs"] == []  # no retry came for this one
