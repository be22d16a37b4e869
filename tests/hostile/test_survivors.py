"""After every case (this module runs last, by name): the valid chest CT sent at the suite's start came
through with its results; the misbehaving destinations got what they should; no PHI anywhere.
"""

from __future__ import annotations

import json
import re
import time
import urllib.error

import pytest

from harness.gateway import GSPS_CLASS, SEG_CLASS, SR_CLASS, RunningGateway
from tests.hostile.conftest import Suite
from tests.hostile.support import CANARY_NEEDLES, assert_alive, assert_kept, db

pytestmark = pytest.mark.integration

RESULT_CLASSES = {SR_CLASS, SEG_CLASS, GSPS_CLASS}


def valid_job(suite: Suite, timeout_s: float = 300.0) -> dict:
    """The valid study's job once its deliveries are settled (none PENDING)."""
    gw, study_uid = suite.gw, suite.valid.study_uid
    deadline = time.monotonic() + timeout_s
    detail: dict = {}
    while time.monotonic() < deadline:
        jobs = gw.api(f"/studies/{study_uid}")["jobs"] if _has_study(gw, study_uid) else []
        for job in jobs:
            detail = gw.api(f"/jobs/{job['id']}")
            settled = detail["deliveries"] and all(d["state"] != "PENDING" for d in detail["deliveries"])
            if detail["state"] in ("DONE", "FAILED") and (settled or detail["failed_stage"] != "send"):
                return detail
        time.sleep(1)
    raise AssertionError(f"the valid study did not settle in {timeout_s}s: {detail}\n{gw.log()[-3000:]}")


def _has_study(gw: RunningGateway, study_uid: str) -> bool:
    try:
        gw.api(f"/studies/{study_uid}")
        return True
    except urllib.error.HTTPError:
        return False


@pytest.fixture(scope="module")
def settled(suite: Suite) -> dict:
    if suite.valid.thread is not None:
        suite.valid.thread.join(timeout=180)
    return valid_job(suite)


def output_uids(job: dict) -> dict[str, str]:
    """SOP Instance UID -> kind of what the job produced."""
    return {o["sop_instance_uid"]: o["kind"] for o in job["outputs"]}


def test_valid_chest_ct_completes_with_its_results(suite: Suite, settled: dict) -> None:
    (res,) = suite.valid.result
    assert res.returncode == 0, res.stderr[-2000:]
    assert_kept(suite.gw, suite.valid.sop_uids, suite.valid.study_uid)
    assert settled["failed_stage"] in (None, "send"), (settled["failed_stage"], settled["reason"])
    assert len(settled["inputs"]) == len(suite.valid.sop_uids)
    by_class: dict[str, set[str]] = {}
    for ds in suite.dest.datasets():
        if str(ds.StudyInstanceUID) == suite.valid.study_uid:
            by_class.setdefault(str(ds.SOPClassUID), set()).add(str(ds.SOPInstanceUID))
    assert set(by_class) >= RESULT_CLASSES, by_class.keys()
    assert set().union(*by_class.values()) == set(output_uids(settled))
    (dest,) = [d for d in settled["deliveries"] if d["destination"] == "dest"]
    assert dest["state"] == "SENT", dest
    assert_alive(suite.gw)


def test_destination_aborting_after_the_2nd_of_3_objects(suite: Suite, settled: dict) -> None:
    produced = output_uids(settled)
    assert len(produced) == 3, produced
    flaky = suite.flaky
    assert len(flaky.aborted) == 1, flaky.aborted
    first = [r.sop_instance for r in flaky.acknowledged if r.association == 1]
    later = [r.sop_instance for r in flaky.acknowledged if r.association > 1]
    assert len(first) == 2
    assert later == [flaky.aborted[0].sop_instance], (first, later)  # only the missing one, same UID
    assert set(first) | set(later) == set(produced)
    (delivery,) = [d for d in settled["deliveries"] if d["destination"] == "flaky"]
    assert delivery["state"] == "SENT", delivery
    with db(suite.gw) as conn:
        row = conn.execute("SELECT sent_uids FROM deliveries WHERE job_id = ? AND destination = ?",
                           (settled["id"], "flaky")).fetchone()
    assert set(json.loads(row["sent_uids"])) == set(produced)


def test_destination_that_never_answers(suite: Suite, settled: dict) -> None:
    (mute,) = [d for d in settled["deliveries"] if d["destination"] == "mute"]
    assert mute["state"] == "DEAD", mute
    assert mute["attempts"] == 3, mute  # sender.max_attempts: every attempt timed out
    assert re.search(r"time|timed out|timeout", mute["last_error"] or "", re.IGNORECASE), mute
    assert len(suite.mute.connections) >= 3
    assert settled["state"] == "FAILED" and settled["failed_stage"] == "send"
    others = [d for d in settled["deliveries"] if d["destination"] != "mute"]
    assert others and all(d["state"] == "SENT" for d in others), others  # unaffected
    assert_alive(suite.gw)


def _api_bodies(gw: RunningGateway) -> list[str]:
    bodies = []
    jobs = gw.api("/jobs?limit=1000")
    bodies.append(json.dumps(jobs))
    bodies += [json.dumps(gw.api(f"/jobs/{j['id']}")) for j in jobs]
    with db(gw) as conn:
        studies = [r[0] for r in conn.execute("SELECT study_uid FROM studies")]
    bodies += [json.dumps(gw.api(f"/studies/{s}")) for s in studies]
    try:
        bodies.append(json.dumps(gw.api("/conflicts")))
    except urllib.error.HTTPError as exc:  # no conflicts endpoint: test_datasets fails for that
        assert exc.code == 404
    return bodies


def test_no_phi_in_logs_rows_or_api_bodies(suite: Suite, settled: dict) -> None:
    gw = suite.gw
    log = gw.log()
    with db(gw) as conn:
        dump = "\n".join(conn.iterdump())
    assert suite.valid.study_uid in dump
    places = {"log": log, "sqlite dump": dump, "api": "\n".join(_api_bodies(gw))}
    hits = {f"{where}: {needle}": text.count(needle) for where, text in places.items()
            for needle in CANARY_NEEDLES if needle in text}
    assert not hits, hits
