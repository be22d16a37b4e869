"""The lease heartbeat: while a worker runs a job, a thread renews the job's lease so no other worker
reclaims it, every min(lease_s / 3, 30 s); a renewal refused (another worker took the job over) sets
`lost` and stops."""

from __future__ import annotations

import logging
import threading
from types import TracebackType

from dicom_gateway.states import JobState
from dicom_gateway.store import Store

log = logging.getLogger("dxgate.worker")

MAX_INTERVAL_S = 30.0


class Heartbeat:
    """``with Heartbeat(store, job_id, worker_id, lease_s) as hb:`` renews the lease until the block ends."""

    def __init__(self, store: Store, job_id: int, worker_id: str, lease_s: float) -> None:
        self.store = store
        self.job_id = job_id
        self.worker_id = worker_id
        self.lease_s = lease_s
        self.interval_s = min(lease_s / 3, MAX_INTERVAL_S)
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"dxgate-lease-{job_id}", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        try:
            while not self._stop.wait(self.interval_s):
                try:
                    renewed = self.store.jobs.renew(self.job_id, self.worker_id, self.lease_s)
                except Exception:  # a busy or failing store: try again at the next beat
                    log.exception("lease renewal failed", extra={"job_id": self.job_id})
                    continue
                if not renewed:  # the job left RUNNING (this worker just finished it) or is another's now
                    self.lost.set()
                    job = self.store.jobs.get(self.job_id)
                    if job is None or job["state"] in (JobState.QUEUED, JobState.RUNNING):
                        log.warning("lease lost: the job was reclaimed for another worker",
                                    extra={"job_id": self.job_id, "reason": f"worker {self.worker_id}"})
                    return
        finally:
            self.store.close()
