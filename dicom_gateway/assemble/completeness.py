"""Study assembly: a study is READY when its associations are released and it has been quiet.

PS3.4 has no "study complete" message for C-STORE pushes, so completeness is inferred: every
association that delivered instances of the study is released (or aborted), and no instance arrived
for `quiet_seconds` (per calling AE override). A late instance reopens the study (see JobStore).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from dicom_gateway.settings import Settings
from dicom_gateway.states import StudyState
from dicom_gateway.store.jobstore import JobStore

log = logging.getLogger("dxgate.assembly")


def mark_ready_studies(settings: Settings, store: JobStore, now: Callable[[], float] = time.time) -> list[str]:
    """Move every complete RECEIVING study to READY; returns their StudyInstanceUIDs."""
    ready: list[str] = []
    t = now()
    for study in store.receiving_studies():
        if study["open_associations"]:
            continue
        if t - study["last_received_at"] < settings.quiet_for(study["calling_ae"]):
            continue
        if store.set_study_state(study["study_uid"], StudyState.READY, expect=StudyState.RECEIVING,
                                 epoch=study["epoch"]):
            log.info("study ready", extra={"study_uid": study["study_uid"], "state": "READY"})
            ready.append(study["study_uid"])
    return ready


def route_ready_studies(settings: Settings, store: JobStore, models: dict) -> int:
    """Route every READY study: jobs QUEUED per (model, series), or UNROUTED with the reasons recorded."""
    from dicom_gateway.route.routing import route_study
    from dicom_gateway.route.series import summarise_series

    created = 0
    all_destinations = [d.name for d in settings.destinations]
    for study in store.studies_in_state(StudyState.READY):
        uid, epoch = study["study_uid"], study["epoch"]
        series = summarise_series(store.study_instances(uid))
        decisions, reasons = route_study(settings.rules, models, series, all_destinations)
        for d in decisions:
            _, new = store.create_job(study_uid=uid, model=d.model, model_version=d.model_version,
                                      series_uid=d.series.series_uid, input_uids=list(d.series.sop_instance_uids),
                                      destinations=d.destinations, rule=d.rule, study_epoch=epoch)
            created += int(new)
        if decisions:
            store.set_study_state(uid, StudyState.ROUTED, expect=StudyState.READY, epoch=epoch,
                                  reason="; ".join(reasons) or None)
            log.info("study routed", extra={"study_uid": uid, "count": len(decisions), "state": "ROUTED"})
        else:
            reason = "; ".join(reasons) or "no routing rule configured"
            store.set_study_state(uid, StudyState.UNROUTED, expect=StudyState.READY, epoch=epoch, reason=reason)
            log.info("study not routed", extra={"study_uid": uid, "state": "UNROUTED", "reason": reason})
    return created
