"""Who may associate with the Storage SCP, and for how long.

Checked when the A-ASSOCIATE-RQ arrives (pynetdicom's EVT_REQUESTED, before any negotiation), in
this order, each refusal answered with A-ASSOCIATE-RJ (PS3.8 7.1.1.9, Table 9-21):

- the called AE title is not ours: permanent, service-user, "called AE title not recognised";
- the calling AE title is not in `allowed_calling_aes`, or is bound to hosts and calls from another
  address: permanent, service-user, "calling AE title not recognised";
- the calling AE already holds `limits.max_associations_per_ae` associations, or the peer's host
  `limits.max_associations_per_host`: transient, service-provider (presentation), "local limit exceeded".

`max_associations` stays pynetdicom's global cap. Counts are of this process's admitted associations
that are still running (with `receivers: N`, per receiver process). Each refusal is logged with the AE
titles and the peer address only. An association older than `limits.max_association_seconds` is
aborted by a watchdog thread (A-ABORT; its acknowledged instances stay recorded).
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
import weakref
from dataclasses import dataclass

from pynetdicom import evt
from pynetdicom.association import Association

from dicom_gateway.settings import Settings

log = logging.getLogger("dxgate.admission")

# (result, source, diagnostic) of A-ASSOCIATE-RJ, PS3.8 Table 9-21.
REJECT_CALLED_AE = (0x01, 0x01, 0x07)
REJECT_CALLING_AE = (0x01, 0x01, 0x03)
REJECT_LIMIT = (0x02, 0x03, 0x02)
REJECT_NO_REASON = (0x02, 0x02, 0x01)


@dataclass(frozen=True)
class Refusal:
    """Why an association request is refused: the A-ASSOCIATE-RJ to answer and a log reason."""

    rsd: tuple[int, int, int]
    reason: str


class Admission:
    """The association admission policy of one Storage SCP and its lifetime watchdog."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._allowed = settings.calling_aes
        self._lock = threading.Lock()
        self._admitted: weakref.WeakKeyDictionary[Association, float] = weakref.WeakKeyDictionary()
        self._aborting: weakref.WeakSet[Association] = weakref.WeakSet()
        self._stop = threading.Event()
        self._watchdog: threading.Thread | None = None

    # -- the decision ----------------------------------------------------------------------------
    def refusal(self, called_ae: str, calling_ae: str, address: str) -> Refusal | None:
        """Why (called AE, calling AE, peer address) may not associate now; None when it may.

        Does not count the request: `on_requested` does that under its lock.
        """
        s = self.settings
        if called_ae != s.ae_title.strip():
            return Refusal(REJECT_CALLED_AE, f"called AE title {called_ae!r} is not {s.ae_title!r}")
        if self._allowed and not any(a.allows(calling_ae, address) for a in self._allowed):
            bound = any(a.ae_title == calling_ae for a in self._allowed)
            why = "is not allowed from this address" if bound else "is not in allowed_calling_aes"
            return Refusal(REJECT_CALLING_AE, f"calling AE title {calling_ae!r} {why}")
        same_ae = same_host = 0
        for assoc in self._running():
            same_ae += _calling_ae(assoc) == calling_ae
            same_host += str(assoc.requestor.address) == address
        if same_ae >= s.limits.max_associations_per_ae:
            return Refusal(REJECT_LIMIT, f"calling AE {calling_ae!r} already holds {same_ae} associations "
                                         f"(limits.max_associations_per_ae)")
        if same_host >= s.limits.max_associations_per_host:
            return Refusal(REJECT_LIMIT, f"host {address} already holds {same_host} associations "
                                         f"(limits.max_associations_per_host)")
        return None

    def _running(self) -> list[Association]:
        return [a for a in list(self._admitted) if a.is_alive() and not a.is_released and not a.is_aborted]

    # -- the pynetdicom hook -------------------------------------------------------------------------
    def on_requested(self, event: evt.Event) -> None:
        """EVT_REQUESTED handler: admit the association or answer A-ASSOCIATE-RJ.

        pynetdicom skips its own negotiation when a handler of this event has rejected the request.
        Any error here refuses (transient): admission fails closed.
        """
        assoc = event.assoc
        address = str(assoc.requestor.address)
        try:
            rq = assoc.requestor.primitive
            called_ae = str(rq.called_ae_title).strip()
            calling_ae = str(rq.calling_ae_title).strip()
            with self._lock:
                refused = self.refusal(called_ae, calling_ae, address)
                if refused is None:
                    self._admitted[assoc] = time.monotonic()
                    return
        except Exception as exc:
            calling_ae = called_ae = "?"
            refused = Refusal(REJECT_NO_REASON, f"admission check failed: {type(exc).__name__}")
            log.exception("admission check failed")
        log.warning("association refused", extra={
            "calling_ae": calling_ae, "called_ae": called_ae, "peer": address, "reason": refused.reason,
            "status": "A-ASSOCIATE-RJ {}/{}/{}".format(*refused.rsd)})
        assoc.acse.send_reject(*refused.rsd)
        assoc.kill()

    # -- max_association_seconds ---------------------------------------------------------------------
    def start_watchdog(self) -> None:
        """Start the thread that aborts associations older than limits.max_association_seconds."""
        if self._watchdog is not None:
            return
        self._stop.clear()
        self._watchdog = threading.Thread(target=self._watch, name="association-watchdog", daemon=True)
        self._watchdog.start()

    def stop_watchdog(self) -> None:
        self._stop.set()
        if self._watchdog is not None:
            self._watchdog.join(timeout=5)
        self._watchdog = None

    def _watch(self) -> None:
        limit = self.settings.limits.max_association_seconds
        interval = min(1.0, limit / 4)
        while not self._stop.wait(interval):
            now = time.monotonic()
            with self._lock:
                old = [(a, now - t) for a, t in list(self._admitted.items())
                       if now - t > limit and a.is_alive() and a not in self._aborting]
                self._aborting.update(a for a, _ in old)
            for assoc, age in old:
                log.warning("association aborted", extra={
                    "calling_ae": _calling_ae(assoc),
                    "reason": f"from {assoc.requestor.address}: open {age:.0f} s, longer than "
                              f"limits.max_association_seconds ({limit:g} s)"})
                threading.Thread(target=_abort, args=(assoc,), name="association-abort", daemon=True).start()


def _calling_ae(assoc: Association) -> str:
    return str(assoc.requestor.ae_title).strip()


def _abort(assoc: Association, grace_s: float = 2.0) -> None:
    """A-ABORT; if the association's thread is stuck on a peer that sends nothing, close its socket."""
    try:
        assoc.abort(block=False)
    except Exception:
        log.exception("A-ABORT failed")
    assoc.join(grace_s)
    if assoc.is_alive():
        sock = getattr(assoc.dul.socket, "socket", None)
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
