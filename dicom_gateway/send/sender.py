"""The result sender: C-STORE each ENCODED job's outputs to its destinations, retrying with back-off.

Each (job, destination) delivery is attempted independently: deliveries are grouped by destination and
every destination is served by its own thread, so a destination that is down (connection timeout =
settings.sender.timeout_s) never delays another. A failed attempt is retried after
min(backoff_initial_s * 2**attempts, backoff_max_s); after max_attempts it becomes a dead letter and the
job store turns the job FAILED at stage "send" (replayable with `dxgate jobs replay`).

Delivery is at-least-once: if a peer stores an instance but its response is lost, the retry sends the
same SOP Instance UID again, which a Storage SCP treats as the same instance. Every instance the peer
acknowledges is recorded at once (deliveries.sent_uids), so after an abort mid-send or a crash the next
attempt sends only the rest.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from dicom_gateway.errors import DeliveryError
from dicom_gateway.send.scu import AssociationFailedError, is_success, store_datasets_or_files
from dicom_gateway.settings import Destination, Settings
from dicom_gateway.store import Store

log = logging.getLogger("dxgate.sender")


def outputs_for(destination: Destination, outputs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The outputs a destination takes: SR / SEG per its flags, and its overlay kind (gsps | sc | none)."""
    wanted = set()
    if destination.send_sr:
        wanted.add("sr")
    if destination.send_seg:
        wanted.add("seg")
    if destination.overlay != "none":
        wanted.add(destination.overlay)
    return [o for o in outputs if o.get("kind") in wanted]


class Sender:
    """Delivers job outputs; `run_once` for one pass (tests, CLI), `run_forever` in the server."""

    def __init__(self, settings: Settings, store: Store, clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.store = store
        self.clock = clock

    # -- one pass -------------------------------------------------------------------------------
    def run_once(self) -> int:
        """Attempt every due delivery once (destinations in parallel); returns how many were attempted."""
        by_dest: dict[str, list[sqlite3.Row]] = defaultdict(list)
        for row in self.store.deliveries.due(now=self.clock()):
            by_dest[row["destination"]].append(row)
        if not by_dest:
            return 0
        if len(by_dest) == 1:
            ((name, rows),) = by_dest.items()
            return self._deliver_all(name, rows)
        with ThreadPoolExecutor(max_workers=len(by_dest), thread_name_prefix="dxgate-send") as pool:
            futures = [pool.submit(self._deliver_all, name, rows) for name, rows in by_dest.items()]
            return sum(f.result() for f in futures)

    def run_destination_once(self, name: str) -> int:
        """Attempt the due deliveries of one destination; returns how many were attempted."""
        rows = [r for r in self.store.deliveries.due(now=self.clock()) if r["destination"] == name]
        return self._deliver_all(name, rows) if rows else 0

    # -- forever --------------------------------------------------------------------------------
    def run_forever(self, stop: threading.Event, poll_s: float = 0.2) -> None:
        """One loop per configured destination (independent), plus one for unknown destination names."""
        names = [d.name for d in self.settings.destinations]
        threads = [threading.Thread(target=self._loop, args=(stop, poll_s, n), name=f"dxgate-send-{n}", daemon=True)
                   for n in names]
        for t in threads:
            t.start()
        known = set(names)
        while not stop.is_set():
            try:  # deliveries naming a destination no longer configured: dead letters with a clear reason
                unknown: dict[str, list[sqlite3.Row]] = defaultdict(list)
                for row in self.store.deliveries.due(now=self.clock()):
                    if row["destination"] not in known:
                        unknown[row["destination"]].append(row)
                for name, rows in unknown.items():
                    self._deliver_all(name, rows)
            except Exception:
                log.exception("sender loop error")
            stop.wait(poll_s)
        for t in threads:
            t.join(timeout=self.settings.sender.timeout_s + 5)
        self.store.close()

    def _loop(self, stop: threading.Event, poll_s: float, name: str) -> None:
        while not stop.is_set():
            try:
                self.run_destination_once(name)
            except Exception:
                log.exception("sender loop error", extra={"destination": name})
            stop.wait(poll_s)
        self.store.close()

    # -- deliveries -----------------------------------------------------------------------------
    def _deliver_all(self, name: str, rows: list[sqlite3.Row]) -> int:
        """Deliveries of one destination, in order; once it is unreachable, the rest fail without trying."""
        try:
            destination: Destination | None = self.settings.destination(name)
        except KeyError:
            destination = None
        unreachable: str | None = None
        for row in rows:
            if destination is None:
                self._record(row, ok=False, error=f"destination {name!r} is not configured", final=True)
            elif unreachable is not None:
                self._record(row, ok=False, error=unreachable)
            else:
                unreachable = self._deliver(destination, row)
        return len(rows)

    def _deliver(self, destination: Destination, row: sqlite3.Row) -> str | None:
        """One delivery attempt; returns the error if the destination could not be associated with."""
        job_id = int(row["job_id"])
        job = self.store.jobs.get(job_id)
        if job is None:
            return None
        acknowledged = set(json.loads(row["sent_uids"] or "[]"))
        wanted = outputs_for(destination, json.loads(job["outputs"]))
        outputs = [o for o in wanted if o.get("sop_instance_uid") not in acknowledged]
        paths = [self._resolve(o["path"]) for o in outputs]
        uid_of = {p: o.get("sop_instance_uid") for p, o in zip(paths, outputs, strict=True)}
        extra = {"job_id": job_id, "destination": destination.name, "count": len(paths)}
        if not paths:
            self._record(row, ok=True)
            why = "acknowledged before" if wanted else "filtered out"
            log.info("nothing left to send to destination (%s)", why, extra=extra)
            return None

        def on_stored(path: Path, status: int) -> None:  # each success, recorded as its response arrives
            uid = uid_of.get(Path(path))
            if uid and is_success(status):
                self.store.deliveries.acknowledge(job_id, destination.name, uid)

        t0 = time.monotonic()
        try:
            statuses = store_datasets_or_files(paths, destination, self.settings.ae_title,
                                               self.settings.sender.timeout_s, tls=self.settings.tls,
                                               on_stored=on_stored)
        except AssociationFailedError as exc:
            self._record(row, ok=False, error=str(exc))
            return str(exc)
        except DeliveryError as exc:
            self._record(row, ok=False, error=str(exc))
            return None
        except Exception as exc:  # anything unexpected is a failed attempt, never a lost delivery
            log.exception("delivery attempt failed", extra=extra)
            self._record(row, ok=False, error=f"{type(exc).__name__}: {exc}")
            return None
        bad = [(p, s) for p, s in statuses if not is_success(s)]
        if bad:
            error = "; ".join(f"{Path(p).name}: 0x{s:04X}" for p, s in bad)
            self._record(row, ok=False, error=f"C-STORE refused: {error}")
        else:
            self._record(row, ok=True)
            log.info("delivered", extra={**extra, "seconds": round(time.monotonic() - t0, 4)})
        return None

    def _resolve(self, path: str) -> Path:
        """Output paths are as the worker recorded them; relative ones are taken under the outbox."""
        p = Path(path)
        if not p.is_absolute() and not p.exists():
            p = self.settings.outbox_dir / p
        return p

    def _record(self, row: sqlite3.Row, *, ok: bool, error: str | None = None, final: bool = False) -> None:
        job_id, name = int(row["job_id"]), str(row["destination"])
        if ok:
            self.store.deliveries.record(job_id, name, ok=True)
            return
        cfg = self.settings.sender
        attempts = int(row["attempts"])
        retry_at: float | None = None
        if not final and attempts + 1 < cfg.max_attempts:
            retry_at = self.clock() + min(cfg.backoff_initial_s * 2 ** attempts, cfg.backoff_max_s)
        self.store.deliveries.record(job_id, name, ok=False, error=error, retry_at=retry_at)
        extra = {"job_id": job_id, "destination": name, "reason": error}
        if retry_at is None:
            log.error("delivery failed for good (dead letter)", extra=extra)
        else:
            log.warning("delivery failed; will retry", extra={**extra, "seconds": round(retry_at - self.clock(), 3)})
