"""Every state machine of the gateway as a table, and the stages a job can fail at (docs/design.md).

A study is RECEIVING until its associations are released and it has been quiet, then READY; routing
turns it ROUTED (jobs created) or UNROUTED (with a recorded reason). A late instance makes it
RECEIVING again with a new epoch. Jobs: QUEUED → RUNNING → ENCODED → SENDING → DONE; any → FAILED
(with the stage that failed); FAILED → QUEUED or SENDING on replay. A delivery (one job, one
destination) is PENDING until a C-STORE succeeds (SENT) or its attempts run out (DEAD, a dead letter).

The store checks every state change against these tables; a change not listed is refused.
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


class Stage(StrEnum):
    """Where in the flow something failed; a FAILED job records one of JOB_STAGES as `failed_stage`.

    The values are the strings stored in the job store and shown by the API, so they never change.
    """

    RECEIVE = "receive"          # C-STORE: the failure is the response status (dicom_gateway.errors)
    ROUTE = "route"              # the study becomes UNROUTED with the reason; no job exists yet
    LOAD_MODEL = "load_model"    # the job's model (and version) is not loaded
    LOAD = "load"                # series -> volume: missing files or slices, wrong modality
    PREPROCESS = "preprocess"
    INFER = "infer"
    POSTPROCESS = "postprocess"
    ENCODE = "encode"            # SR / SEG / GSPS / SC
    VALIDATE = "validate"        # dciodvfy and the highdicom round trip
    SEND = "send"                # C-STORE to a destination: a dead letter


STUDY_STAGES: frozenset[Stage] = frozenset({Stage.RECEIVE, Stage.ROUTE})
"""Stages before a job exists: they fail a C-STORE or a study, never a job."""

JOB_STAGES: tuple[Stage, ...] = tuple(s for s in Stage if s not in STUDY_STAGES)
"""The stages a job can fail at, in the order a job runs them."""


STUDY_TRANSITIONS: dict[StudyState, frozenset[StudyState]] = {
    # RECEIVING -> RECEIVING: another instance of the study arrived.
    StudyState.RECEIVING: frozenset({StudyState.RECEIVING, StudyState.READY}),
    # READY -> RECEIVING: a late instance arrived before routing (a new epoch).
    StudyState.READY: frozenset({StudyState.ROUTED, StudyState.UNROUTED, StudyState.RECEIVING}),
    StudyState.ROUTED: frozenset({StudyState.RECEIVING}),    # a late instance: a new epoch
    StudyState.UNROUTED: frozenset({StudyState.RECEIVING}),  # a late instance: a new epoch
}

JOB_TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.QUEUED: frozenset({JobState.RUNNING, JobState.FAILED}),
    # RUNNING -> QUEUED: a lease expired (the worker died) and the job is reclaimed.
    JobState.RUNNING: frozenset({JobState.ENCODED, JobState.FAILED, JobState.QUEUED}),
    JobState.ENCODED: frozenset({JobState.SENDING, JobState.FAILED}),
    JobState.SENDING: frozenset({JobState.DONE, JobState.FAILED}),
    JobState.DONE: frozenset({JobState.SENDING, JobState.QUEUED}),  # replay: resend or rerun
    JobState.FAILED: frozenset({JobState.QUEUED, JobState.SENDING}),  # replay
}

DELIVERY_TRANSITIONS: dict[DeliveryState, frozenset[DeliveryState]] = {
    # PENDING -> PENDING: a failed attempt with a retry scheduled.
    DeliveryState.PENDING: frozenset({DeliveryState.PENDING, DeliveryState.SENT, DeliveryState.DEAD}),
    DeliveryState.SENT: frozenset({DeliveryState.PENDING}),  # replay of a DONE job: a deliberate resend
    DeliveryState.DEAD: frozenset({DeliveryState.PENDING}),  # replay: resend the dead letter
}


def can_transition(src: JobState, dst: JobState) -> bool:
    """Whether a job may move from src to dst."""
    return dst in JOB_TRANSITIONS[src]


def can_study_transition(src: StudyState, dst: StudyState) -> bool:
    """Whether a study may move from src to dst."""
    return dst in STUDY_TRANSITIONS[src]


def can_delivery_transition(src: DeliveryState, dst: DeliveryState) -> bool:
    """Whether a delivery may move from src to dst."""
    return dst in DELIVERY_TRANSITIONS[src]
