"""Study and job states and the one transition table (see DESIGN.md "Data flow").

A study is RECEIVING until its associations are released and it has been quiet, then READY; routing
turns it ROUTED (jobs created) or UNROUTED (with a recorded reason). A late instance makes it
RECEIVING again with a new epoch. Jobs: QUEUED → RUNNING → ENCODED → SENDING → DONE; any → FAILED
(with the stage that failed); FAILED → QUEUED or SENDING on replay.
"""

from __future__ import annotations

from enum import StrEnum


class StudyState(StrEnum):
    RECEIVING = "RECEIVING"
    READY = "READY"
    ROUTED = "ROUTED"
    UNROUTED = "UNROUTED"


class JobState(StrEnum):
    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    ENCODED = "ENCODED"
    SENDING = "SENDING"
    DONE = "DONE"
    FAILED = "FAILED"


class DeliveryState(StrEnum):
    PENDING = "PENDING"
    SENT = "SENT"
    DEAD = "DEAD"


JOB_TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.QUEUED: frozenset({JobState.RUNNING, JobState.FAILED}),
    # RUNNING -> QUEUED: a lease expired (the worker died) and the job is reclaimed.
    JobState.RUNNING: frozenset({JobState.ENCODED, JobState.FAILED, JobState.QUEUED}),
    JobState.ENCODED: frozenset({JobState.SENDING, JobState.FAILED}),
    JobState.SENDING: frozenset({JobState.DONE, JobState.FAILED}),
    JobState.DONE: frozenset({JobState.SENDING, JobState.QUEUED}),  # replay: resend or rerun
    JobState.FAILED: frozenset({JobState.QUEUED, JobState.SENDING}),  # replay
}


def can_transition(src: JobState, dst: JobState) -> bool:
    return dst in JOB_TRANSITIONS[src]
