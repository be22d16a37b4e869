"""Several Storage SCP processes on one port (setting `receivers` > 1, Linux).

pynetdicom handles PDUs in pure Python, so one process is bound by one core (the GIL). With
`receivers: N` the main process starts N receiver processes (multiprocessing, spawn); each runs a
`StorageSCP` whose listening sockets (dicom_port and the TLS port) set SO_REUSEPORT, so the kernel
spreads incoming associations over them. They share the job store (SQLite WAL, busy timeout) and
the spool; assembly, routing, workers, sender and the HTTP API stay in the main process.

A receiver reports the ids of the associations it opens and closes over a pipe, so that when it dies
the main process closes (aborted) exactly its open associations and their studies can still become
READY; then it starts a new receiver. A receiver dies with its parent (PR_SET_PDEATHSIG, and a
getppid() poll), so a SIGKILLed gateway never leaves listeners holding the port.
"""

from __future__ import annotations

import contextlib
import ctypes
import faulthandler
import json
import logging
import multiprocessing as mp
import os
import signal
import socket
import sys
import threading
import time
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from multiprocessing.synchronize import Event as MpEvent
from pathlib import Path

from dicom_gateway.errors import ConfigError, GatewayError
from dicom_gateway.settings import Settings
from dicom_gateway.store import Associations, Store
from dicom_gateway.store.db import Database

log = logging.getLogger("dxgate.receivers")

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
START_TIMEOUT_S = 60.0
RESTART_MIN_INTERVAL_S = 1.0
MONITOR_INTERVAL_S = 0.5
SHUTDOWN_GRACE_S = 15.0  # a stopping receiver that is still alive after this dumps its threads and exits


class StopRequest:
    """Set by a signal (SIGTERM, also sent by Linux when the parent dies), read by the receiver's loop.

    The handler only appends to a list. A handler that takes a lock deadlocks when the signal lands
    while the main thread holds that lock: `threading.Event.set()` in the handler against
    `Event.wait()` in the loop froze a receiver for good under load.
    """

    def __init__(self) -> None:
        self._signals: list[int] = []

    def install(self, signum: int = signal.SIGTERM) -> None:
        signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, _frame: object) -> None:
        self._signals.append(signum)

    def __bool__(self) -> bool:
        return bool(self._signals)

    def sleep(self, seconds: float) -> None:
        """Sleep unless already requested (a signal interrupts the sleep only to run the handler)."""
        if not self._signals:
            time.sleep(seconds)


# -- child side -------------------------------------------------------------------------------
class _ReportingAssociations(Associations):
    """Associations that also tell the parent which ones this process opened and closed."""

    def __init__(self, db: Database, report: Connection | None) -> None:
        super().__init__(db)
        self._report = report
        self._report_lock = threading.Lock()

    def _send(self, what: str, association_id: int) -> None:
        if self._report is None:
            return
        try:
            with self._report_lock:
                self._report.send((what, association_id))
        except OSError:  # the parent is gone; the pdeathsig / getppid poll ends this process
            log.debug("could not report association %s %d to the parent", what, association_id)

    def open(self, calling_ae: str, peer: str | None, *, called_ae: str | None = None, tls: bool = False) -> int:
        association_id = super().open(calling_ae, peer, called_ae=called_ae, tls=tls)
        self._send("open", association_id)
        return association_id

    def close(self, association_id: int, aborted: bool = False) -> None:
        super().close(association_id, aborted=aborted)
        self._send("close", association_id)


def _die_with_parent(parent_pid: int) -> None:
    """Ask Linux to send SIGTERM when the parent dies; exit now if it is already gone.

    Linux sends it when the parent *thread* that started the child ends: receivers are started by the
    thread calling `ReceiverPool.start()` (the main thread in `dxgate serve`) or by the monitor thread.
    """
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
                log.warning("prctl(PR_SET_PDEATHSIG) failed: errno %d; relying on polling", ctypes.get_errno())
        except (OSError, AttributeError) as exc:
            log.warning("prctl unavailable (%s); relying on polling", exc)
    if os.getppid() != parent_pid:
        raise SystemExit(0)


def _load_settings(settings_json_or_path: str) -> Settings:
    text = settings_json_or_path.lstrip()
    if text.startswith("{"):
        return Settings(**json.loads(text))
    from dicom_gateway.settings import load_settings

    return load_settings(Path(settings_json_or_path))


def run_receiver(settings_json_or_path: str, stop_event: MpEvent, ready: MpEvent | None = None,
                 report: Connection | None = None, parent_pid: int | None = None) -> None:
    """Receiver process body: one StorageSCP (SO_REUSEPORT) on the shared store and spool until stopped.

    Stops on `stop_event`, SIGTERM (also sent by Linux when the parent dies) or when the parent is gone.
    `ready` is set once listening; `report` receives ("open" | "close", association id) tuples.
    """
    from dicom_gateway.logs import configure_logging
    from dicom_gateway.receive.scp import StorageSCP
    from dicom_gateway.receive.spool import Spool

    parent_pid = parent_pid if parent_pid is not None else os.getppid()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group; the parent decides
    term = StopRequest()
    term.install(signal.SIGTERM)
    _die_with_parent(parent_pid)
    settings = _load_settings(settings_json_or_path)
    configure_logging(settings.log_level, settings.log_format)
    store = Store(settings.db_path, durable=settings.fsync)
    store.associations = _ReportingAssociations(store.db, report)
    spool = Spool(settings.spool_dir, fsync=settings.fsync, min_free_bytes=settings.min_free_disk_bytes)
    scp = StorageSCP(settings, store, spool, reuse_port=True)
    scp.start()
    log.info("receiver started", extra={"reason": f"pid {os.getpid()} port {scp.port}"})
    if ready is not None:
        ready.set()
    try:
        while not (term or stop_event.is_set()):
            if os.getppid() != parent_pid:
                log.warning("receiver's parent is gone; stopping")
                break
            term.sleep(MONITOR_INTERVAL_S)
    finally:
        # From here the process ends within the grace period whatever a peer or a thread does; if it
        # has to be cut short, the stacks of all its threads go to stderr (the log) first.
        faulthandler.dump_traceback_later(SHUTDOWN_GRACE_S, exit=True)
        scp.stop()  # aborts open associations; their close is recorded and reported
        store.close()
        log.info("receiver stopped", extra={"reason": f"pid {os.getpid()}"})


# -- parent side ------------------------------------------------------------------------------
class _Slot:
    """One receiver process and what the parent knows about it."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.proc: BaseProcess | None = None
        self.ready: MpEvent | None = None
        self.conn: Connection | None = None
        self.open_ids: set[int] = set()
        self.started_at = 0.0


class ReceiverPool:
    """`settings.receivers` receiver processes, monitored and restarted by a thread of the main process."""

    def __init__(self, settings: Settings, store: Store) -> None:
        if not hasattr(socket, "SO_REUSEPORT"):
            raise ConfigError(f"receivers: {settings.receivers} needs SO_REUSEPORT, which {sys.platform} lacks; "
                              "set receivers: 1")
        self.settings = settings
        self.store = store
        self._ctx = mp.get_context("spawn")
        self._stop = self._ctx.Event()
        self._stopping = threading.Event()
        self._settings_json = settings.model_dump_json()
        self._slots = [_Slot(i) for i in range(settings.receivers)]
        self._lock = threading.Lock()
        self._monitor: threading.Thread | None = None

    def start(self, timeout: float = START_TIMEOUT_S) -> None:
        """Start every receiver and wait until each listens; GatewayError if one cannot start."""
        if self.settings.tls is not None:
            from dicom_gateway.receive.tls import server_context

            server_context(self.settings.tls)  # unreadable certificate or key: ConfigError here, not in a child
        for slot in self._slots:
            self._start_slot(slot)
        deadline = time.monotonic() + timeout
        for slot in self._slots:
            assert slot.proc is not None and slot.ready is not None
            while not slot.ready.wait(0.1):
                if not slot.proc.is_alive() or time.monotonic() > deadline:
                    code = slot.proc.exitcode
                    self.stop()
                    raise GatewayError(f"receiver {slot.index} did not start (exit code {code}); "
                                       f"is port {self._ports()} used by another program?")
        self._monitor = threading.Thread(target=self._monitor_loop, name="receivers-monitor", daemon=True)
        self._monitor.start()
        log.info("receivers listening", extra={"reason": f"{len(self._slots)} processes on port "
                                                         f"{self._ports()} (SO_REUSEPORT)"})

    def _ports(self) -> str:
        """The ports every receiver listens on: dicom_port (unless 0) and tls.port."""
        s = self.settings
        ports = [str(s.dicom_port)] if s.dicom_port else []
        return " and ".join(ports + ([f"{s.tls.port} (TLS)"] if s.tls is not None else []))

    def _start_slot(self, slot: _Slot) -> None:
        reader, writer = self._ctx.Pipe(duplex=False)
        slot.ready = self._ctx.Event()
        slot.proc = self._ctx.Process(target=run_receiver, name=f"dxgate-receiver-{slot.index}",
                                      args=(self._settings_json, self._stop, slot.ready, writer, os.getpid()),
                                      daemon=True)
        slot.proc.start()
        writer.close()  # the child holds the only write end: EOF once it is gone
        slot.conn = reader
        slot.open_ids = set()
        slot.started_at = time.monotonic()

    def alive(self) -> bool:
        """True when every receiver process runs and listens."""
        with self._lock:
            return all(s.proc is not None and s.proc.is_alive() and s.ready is not None and s.ready.is_set()
                       for s in self._slots)

    @property
    def pids(self) -> list[int | None]:
        return [s.proc.pid if s.proc else None for s in self._slots]

    def _drain(self, slot: _Slot) -> None:
        conn = slot.conn
        if conn is None:
            return
        try:
            while conn.poll():
                what, association_id = conn.recv()
                if what == "open":
                    slot.open_ids.add(association_id)
                else:
                    slot.open_ids.discard(association_id)
        except (EOFError, OSError):
            conn.close()
            slot.conn = None

    def _reap(self, slot: _Slot) -> None:
        """A receiver has exited: close the associations it left open (they can never be released)."""
        self._drain(slot)
        if slot.conn is not None:
            slot.conn.close()
            slot.conn = None
        for association_id in sorted(slot.open_ids):
            try:
                self.store.associations.close(association_id, aborted=True)
            except Exception:
                log.exception("could not close association %d of receiver %d", association_id, slot.index)
        if slot.open_ids:
            log.warning("closed %d association(s) left open by receiver %d", len(slot.open_ids), slot.index)
        slot.open_ids = set()

    def _monitor_loop(self) -> None:
        # This thread must outlive the receivers it restarts (their PR_SET_PDEATHSIG follows it).
        while not self._stopping.is_set():
            try:
                self._monitor_once()
            except Exception:
                log.exception("receiver monitor error")
                self._stopping.wait(MONITOR_INTERVAL_S)

    def _monitor_once(self) -> None:
        """Read association reports; restart receivers that have exited."""
        conns = [s.conn for s in self._slots if s.conn is not None]
        if conns:
            wait(conns, timeout=MONITOR_INTERVAL_S)
        else:
            self._stopping.wait(MONITOR_INTERVAL_S)
        for slot in self._slots:
            self._drain(slot)
            proc = slot.proc
            if self._stopping.is_set() or proc is None or proc.is_alive():
                continue
            if time.monotonic() - slot.started_at < RESTART_MIN_INTERVAL_S:
                continue  # a receiver that dies at once is not restarted in a tight loop
            log.error("receiver %d (pid %s) exited with code %s; restarting it", slot.index, proc.pid,
                      proc.exitcode)
            with self._lock:
                self._reap(slot)
                proc.close()
                if not self._stopping.is_set():
                    self._start_slot(slot)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM every receiver, join with a timeout, then SIGKILL what is left; close their associations."""
        self._stopping.set()
        self._stop.set()
        if self._monitor is not None:
            self._monitor.join(timeout=5)
        with self._lock:
            procs = [s.proc for s in self._slots if s.proc is not None]
            for proc in procs:
                if proc.is_alive():
                    proc.terminate()
            deadline = time.monotonic() + timeout
            for proc in procs:
                proc.join(max(0.1, deadline - time.monotonic()))
                if proc.is_alive():
                    log.warning("receiver pid %s did not stop in %.0f s; killing it", proc.pid, timeout)
                    proc.kill()
                    proc.join(5)
            for slot in self._slots:
                self._reap(slot)
                if slot.proc is not None and not slot.proc.is_alive():
                    with contextlib.suppress(ValueError):
                        slot.proc.close()
                slot.proc = None
        log.info("receivers stopped")
