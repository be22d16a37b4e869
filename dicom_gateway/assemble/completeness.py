"""Study assembly: a study is READY when its associations are closed and it has been quiet.

PS3.4 has no "study complete" message for C-STORE pushes, so completeness is inferred: every
association that delivered instances of the study is closed, and no instance arrived for
`quiet_seconds` (per calling AE override). An aborted association (PS3.8 7.3, A-ABORT) is no evidence
of completeness: the study then also waits `abort_grace_seconds` from the abort for the sender's retry
(a released association opened after it), unless the count evidence (`assemble.evidence`) shows every
series complete. A late instance reopens the study (`store.instances`). READY studies are then routed:
jobs QUEUED, or UNROUTED with the reasons recorded; series still incomplete are left out ("incomplete
series: ...").
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from dicom_gateway.route.routing import route_study
from dicom_gateway.route.series import summarise_series
from dicom_gateway.settings import Settings
from dicom_gateway.states import Stage, StudyState
from dicom_gateway.store import Store

log = logging.getLogger("dxgate.assembly")


def mark_ready_studies(settings: Settings, store: Store, now: Callable[[], float] = time.time) -> list[str]:
    """Move every complete RECEIVING study to READY; returns their StudyInstanceUIDs."""
    ready: list[str] = []
    t = now()
    for study in store.studies.receiving():
        if study["open_associations"]:
            continue
        if t - study["last_received_at"] < settings.quiet_for(study["calling_ae"]):
            continue
        aborted_at = study["aborted_at"]
        if aborted_at is not None and t - aborted_at < settings.abort_grace_seconds \
                and not counts_complete(store, study["study_uid"]):
            continue  # an abort, no retry yet, and the headers do not show every image arrived
        if store.studies.set_state(study["study_uid"], StudyState.READY, expect=StudyState.RECEIVING,
                                   epoch=study["epoch"]):
            log.info("study ready", extra={"study_uid": study["study_uid"], "state": "READY"})
            ready.append(study["study_uid"])
    return ready


def counts_complete(store: Store, study_uid: str) -> bool:
    """Whether the count evidence shows every series of the study complete (Images in Acquisition)."""
    series = summarise_series(store.instances.of_study(study_uid))
    return bool(series) and all(s.evidence is not None and s.evidence.complete for s in series)


def route_ready_studies(settings: Settings, store: Store, models: dict) -> int:
    """Route every READY study; returns how many jobs were created.

    A study whose routing raises becomes UNROUTED with the error as its reason (stage route), so one
    bad study never holds up the studies behind it; a late instance reopens it.
    """
    created = 0
    for study in store.studies.in_state(StudyState.READY):
        try:
            created += _route(settings, store, models, study)
        except Exception as exc:
            reason = f"{Stage.ROUTE} failed: {type(exc).__name__}: {exc}"
            log.exception("routing failed", extra={"study_uid": study["study_uid"], "stage": str(Stage.ROUTE)})
            store.studies.set_state(study["study_uid"], StudyState.UNROUTED, expect=StudyState.READY,
                                    epoch=study["epoch"], reason=reason)
    return created


def _route(settings: Settings, store: Store, models: dict, study: Any) -> int:
    """One READY study: a job per (model, series) decided, then ROUTED; or UNROUTED with the reasons."""
    uid, epoch = study["study_uid"], study["epoch"]
    series = summarise_series(store.instances.of_study(uid))
    decisions, reasons = route_study(settings.rules, models, series, [d.name for d in settings.destinations])
    created = 0
    for d in decisions:
        _, new = store.jobs.create(study_uid=uid, model=d.model, model_version=d.model_version,
                                   series_uid=d.series.series_uid, input_uids=list(d.series.sop_instance_uids),
                                   destinations=d.destinations, rule=d.rule, study_epoch=epoch)
        created += int(new)
    if decisions:
        store.studies.set_state(uid, StudyState.ROUTED, expect=StudyState.READY, epoch=epoch,
                                reason="; ".join(reasons) or None)
        log.info("study routed", extra={"study_uid": uid, "count": len(decisions), "state": "ROUTED"})
    else:
        reason = "; ".join(reasons) or "no routing rule configured"
        store.studies.set_state(uid, StudyState.UNROUTED, expect=StudyState.READY, epoch=epoch, reason=reason)
        log.info("study not routed", extra={"study_uid": uid, "state": "UNROUTED", "reason": reason})
    return created
