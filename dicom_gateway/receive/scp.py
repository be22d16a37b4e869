"""The Storage SCP (PS3.4 Annex B) and Verification SCP: receive, store durably, answer.

DESIGN "The SCP handler only stores": the C-STORE handler reads the data set header (no pixel decode),
writes the bytes as received to the spool (atomic, fsync per setting), records the instance in the job
store and only then answers 0x0000. Anything else is answered with the status `dimse_status` gives
the exception: 0xA700 out of resources, 0xC210/0xC211 cannot understand. A duplicate SOP instance is
answered 0x0000 without writing again (a resend after a lost response must not fail); one with the
same SOP Instance UID but other content is kept as a conflict (receive/duplicates.py)
and answered 0x0000. Received PDUs and data sets are bounded (receive/caps.py).
"""

from __future__ import annotations

import hashlib
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable
from io import BytesIO
from pathlib import Path
from typing import Any

from pydicom.dataset import FileMetaDataset
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import (
    JPEG2000,
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from dicom_gateway import __version__
from dicom_gateway.errors import STATUS_SUCCESS, DatasetTooLargeError, UnparsableDatasetError, dimse_status
from dicom_gateway.metrics import observe_cstore
from dicom_gateway.receive.admission import Admission
from dicom_gateway.receive.caps import OversizedDataSet, install_receive_caps
from dicom_gateway.receive.duplicates import dataset_part, received_again
from dicom_gateway.receive.headers import identifiers, instance_record, parse_dataset_bytes
from dicom_gateway.receive.listeners import start_listener
from dicom_gateway.receive.spool import Spool
from dicom_gateway.receive.tls import server_context
from dicom_gateway.settings import Settings
from dicom_gateway.settings_security import is_loopback
from dicom_gateway.store import ConflictRecord, Store
from inference.redaction import redact

log = logging.getLogger("dxgate.scp")


def _optional_uids(*names: str) -> list[str]:
    import pydicom.uid

    return [getattr(pydicom.uid, n) for n in names if hasattr(pydicom.uid, n)]


# Accepted as-is, never transcoded (PS3.5 Annex A / 8.2). The requestor's order decides among them.
TRANSFER_SYNTAXES: list[str] = [
    ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian,
    JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLossless, JPEGLosslessSV1, JPEGLSLossless, JPEGLSNearLossless,
    JPEG2000Lossless, JPEG2000, RLELossless,
    *_optional_uids("HTJ2KLossless", "HTJ2KLosslessRPCL", "HTJ2K"),
]

IMPLEMENTATION_VERSION_NAME = f"DXGATE_{__version__}"[:16]
EVENT_STORED = "stored"
"""`on_event` is called with this after a new instance is stored and recorded."""
EVENT_ASSOCIATION_CLOSED = "association_closed"
"""`on_event` is called with this after an association is released or aborted."""


def set_tcp_nodelay(event: evt.Event) -> None:
    """EVT_CONN_OPEN handler: disable Nagle's algorithm on the association's socket."""
    sock = getattr(getattr(event.assoc.dul, "socket", None), "socket", None)
    if sock is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError as exc:  # e.g. not a TCP socket; latency only, never fatal
            log.debug("could not set TCP_NODELAY: %s", exc)


def file_meta_bytes(sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str, *,
                    sending_ae: str | None, receiving_ae: str) -> bytes:
    """Preamble, "DICM" and the File Meta Information group for a received data set (PS3.10 7.1)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class_uid)
    meta.MediaStorageSOPInstanceUID = UID(sop_instance_uid)
    meta.TransferSyntaxUID = UID(transfer_syntax)
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    meta.SourceApplicationEntityTitle = receiving_ae
    if sending_ae:
        meta.SendingApplicationEntityTitle = sending_ae
    meta.ReceivingApplicationEntityTitle = receiving_ae
    buf = BytesIO()
    buf.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(buf, meta, enforce_standard=True)  # type: ignore[arg-type]
    return buf.getvalue()


class StorageSCP:
    """Accepts associations for Verification and every storage SOP class, and stores what it receives."""

    def __init__(self, settings: Settings, store: Store, spool: Spool,
                 on_event: Callable[[str], None] | None = None, *, reuse_port: bool = False) -> None:
        self.settings = settings
        self.reuse_port = reuse_port
        self.store = store
        self.spool = spool
        self.on_event = on_event
        self._server: ThreadedAssociationServer | None = None  # the plain TCP listener
        self._tls_server: ThreadedAssociationServer | None = None
        self.admission = Admission(settings)
        self._assoc_ids: dict[Association, int] = {}
        self._assoc_lock = threading.Lock()
        # Per-SOP-instance mutual exclusion (striped): two associations carrying the same instance
        # must not both write it, and a failed record must only remove a file nobody acknowledged.
        self._sop_locks = [threading.Lock() for _ in range(64)]
        self.ae = self._make_ae()

    # -- lifecycle -------------------------------------------------------------------------------
    def _make_ae(self) -> AE:
        s = self.settings
        ae = AE(ae_title=s.ae_title)
        ae.add_supported_context(Verification)
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax, TRANSFER_SYNTAXES)
        ae.maximum_pdu_size = s.max_pdu  # 0 = no limit (PS3.8 D.3.3.2.1)
        install_receive_caps(ae, s)  # received PDUs and data sets bounded (receive/caps.py)
        ae.maximum_associations = s.max_associations  # the global cap: A-ASSOCIATE-RJ transient, local limit
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = s.network_timeout_s
        # Called and calling AE titles, hosts and per-AE / per-host limits: self.admission (EVT_REQUESTED).
        ae.require_calling_aet = []
        ae.require_called_aet = False
        return ae

    def _handlers(self) -> list[tuple[Any, Callable[..., Any]]]:
        handlers: list[tuple[Any, Callable[..., Any]]] = [
            (evt.EVT_REQUESTED, self.admission.on_requested),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_RELEASED, self._on_released),
            (evt.EVT_ABORTED, self._on_aborted),
            (evt.EVT_CONN_CLOSE, self._on_conn_close),
            (evt.EVT_C_STORE, self._on_store),
        ]
        if self.settings.tcp_nodelay:
            handlers.insert(0, (evt.EVT_CONN_OPEN, set_tcp_nodelay))
        return handlers

    def start(self) -> None:
        """Listen on bind_address: dicom_port (unless 0) and tls.port (with a tls block), non-blocking."""
        if self.is_running:
            return
        s = self.settings
        tls_context = server_context(s.tls) if s.tls is not None else None  # ConfigError before any listener
        try:
            if s.dicom_port:
                self._server = self._start_server(s.dicom_port, None)
            if s.tls is not None:
                self._tls_server = self._start_server(s.tls.port, tls_context)
        except BaseException:
            self.stop()
            raise
        self.admission.start_watchdog()
        listening = [f"{s.bind_address}:{self.port}"] if self._server is not None else []
        listening += [f"{s.bind_address}:{self.tls_port} (TLS)"] if self._tls_server is not None else []
        log.info("storage SCP listening", extra={"reason": f"AE {s.ae_title} on {', '.join(listening)}"})
        if self._server is not None and not is_loopback(s.bind_address) and not s.allowed_calling_aes:
            log.warning("plain DICOM port open to the network", extra={"reason": (
                f"{s.bind_address}:{self.port} accepts any calling AE without TLS; set allowed_calling_aes, "
                "or dicom_port: 0 to accept DICOM over TLS only")})

    def _start_server(self, port: int, tls_context: ssl.SSLContext | None) -> ThreadedAssociationServer:
        s = self.settings
        return start_listener(self.ae, (s.bind_address, port), self._handlers(), tls_context=tls_context,
                              reuse_port=self.reuse_port, handshake_timeout_s=s.network_timeout_s,
                              max_connections_per_host=s.limits.max_associations_per_host)

    def stop(self) -> None:
        """Stop listening and abort open associations (their instances stay recorded, they are closed)."""
        self.admission.stop_watchdog()
        if not self.is_running:
            return
        self.ae.shutdown()
        self._server = self._tls_server = None
        log.info("storage SCP stopped")

    @property
    def port(self) -> int:
        """The bound plain TCP port (settings.dicom_port until started; 0: no plain listener)."""
        if self._server is None:
            return self.settings.dicom_port
        return int(self._server.server_address[1])

    @property
    def tls_port(self) -> int | None:
        """The bound TLS port (tls.port until started); None without a tls block."""
        if self._tls_server is not None:
            return int(self._tls_server.server_address[1])
        return self.settings.tls.port if self.settings.tls is not None else None

    @property
    def is_running(self) -> bool:
        return self._server is not None or self._tls_server is not None

    # -- association bookkeeping ----------------------------------------------------------------
    @staticmethod
    def _calling_ae(assoc: Association) -> str:
        return str(assoc.requestor.ae_title).strip()

    def _on_accepted(self, event: evt.Event) -> None:
        calling_ae = self._calling_ae(event.assoc)
        called_ae = str(event.assoc.requestor.primitive.called_ae_title).strip()
        tls = isinstance(getattr(event.assoc.dul.socket, "socket", None), ssl.SSLSocket)
        assoc_id = self.store.associations.open(calling_ae, event.assoc.requestor.address, called_ae=called_ae,
                                                tls=tls)
        with self._assoc_lock:
            self._assoc_ids[event.assoc] = assoc_id
        log.info("association accepted", extra={"calling_ae": calling_ae, "association_id": assoc_id})

    def _on_rejected(self, event: evt.Event) -> None:
        # The admission policy logs its own refusals; this is pynetdicom's global max_associations.
        log.warning("association rejected", extra={
            "calling_ae": self._calling_ae(event.assoc),
            "reason": f"from {event.assoc.requestor.address}: max_associations "
                      f"({self.settings.max_associations}) reached"})

    def _close(self, event: evt.Event, aborted: bool, how: str) -> None:
        with self._assoc_lock:
            assoc_id = self._assoc_ids.pop(event.assoc, None)
        if assoc_id is None:
            return
        self.store.associations.close(assoc_id, aborted=aborted)
        log.info(f"association {how}", extra={"calling_ae": self._calling_ae(event.assoc),
                                              "association_id": assoc_id})
        self._notify(EVENT_ASSOCIATION_CLOSED)

    def _on_released(self, event: evt.Event) -> None:
        self._close(event, aborted=False, how="released")

    def _on_aborted(self, event: evt.Event) -> None:
        self._close(event, aborted=True, how="aborted")

    def _on_conn_close(self, event: evt.Event) -> None:
        self._close(event, aborted=True, how="closed without release")

    def _notify(self, what: str) -> None:
        if self.on_event is None:
            return
        try:
            self.on_event(what)
        except Exception:
            log.exception("on_event callback failed")

    # -- C-STORE --------------------------------------------------------------------------------
    def _on_store(self, event: evt.Event) -> int:
        t0 = time.monotonic()
        req = event.request
        calling_ae = self._calling_ae(event.assoc)
        with self._assoc_lock:
            assoc_id = self._assoc_ids.get(event.assoc)
        extra: dict[str, Any] = {"sop_instance_uid": str(req.AffectedSOPInstanceUID), "calling_ae": calling_ae,
                                 "association_id": assoc_id}
        try:
            outcome = self._store(event, calling_ae, assoc_id, extra)
            status = STATUS_SUCCESS
        except Exception as exc:
            status = dimse_status(exc)
            extra.update(status=f"0x{status:04X}", reason=redact(f"{type(exc).__name__}: {exc}"))  # no values
            log.warning("C-STORE refused", extra=extra, exc_info=status not in (0xA700, 0xC210, 0xC211))
            observe_cstore(status)
            return status
        extra.update(status="0x0000", seconds=round(time.monotonic() - t0, 4))
        log.info(f"C-STORE {outcome}", extra=extra)
        observe_cstore(status)
        if outcome == "stored":
            self._notify(EVENT_STORED)
        return status

    def _store(self, event: evt.Event, calling_ae: str, assoc_id: int | None, extra: dict[str, Any]) -> str:
        req = event.request
        ts = str(event.context.transfer_syntax)
        data = self._received_bytes(event)
        ds = parse_dataset_bytes(data, ts, max_bytes=self.settings.limits.max_dataset_bytes)
        study, series, sop = identifiers(ds)
        extra.update(study_uid=study, series_uid=series)
        path = self.spool.path_for(study, series, sop)  # refuses malformed UIDs before anything is written
        if sop != str(req.AffectedSOPInstanceUID).strip():
            raise UnparsableDatasetError(
                f"data set SOP Instance UID {sop} differs from the command's {req.AffectedSOPInstanceUID}")
        meta = file_meta_bytes(str(req.AffectedSOPClassUID), sop, ts, sending_ae=calling_ae,
                               receiving_ae=self.settings.ae_title)
        view = data.getbuffer()
        try:
            digest = hashlib.sha256(view).hexdigest()
            with self._sop_locks[hash(sop) % len(self._sop_locks)]:
                if self.store.instances.exists(sop):
                    return received_again(self.store, self.spool, ConflictRecord(
                        sop_instance_uid=sop, study_uid=study, series_uid=series, path="",
                        size=len(meta) + len(view), content_sha256=digest, stored_sha256=None,
                        calling_ae=calling_ae, association_id=assoc_id), (meta, view), extra)
                rec = instance_record(ds, path=path, size=len(meta) + len(view), transfer_syntax=ts,
                                      calling_ae=calling_ae, association_id=assoc_id,
                                      sop_class_uid=str(req.AffectedSOPClassUID), content_sha256=digest)
                self.spool.store(study, series, sop, (meta, view))
                try:
                    new = self.store.instances.record(rec)
                except BaseException:
                    self.spool.remove(path)  # nothing unrecorded stays; the peer gets a failure and resends
                    raise
        finally:
            view.release()
        return "stored" if new else "duplicate (already stored)"

    @staticmethod
    def _received_bytes(event: evt.Event) -> BytesIO:
        """The encoded data set as received (without file meta), whichever way pynetdicom kept it.

        A data set the receive cap cut short (receive/caps.py) raises DatasetTooLargeError (0xA700).
        """
        try:
            chunked: Path | None = event.dataset_path  # only with _config.STORE_RECV_CHUNKED_DATASET
        except AttributeError:
            chunked = None
        if chunked is None:
            data = event.request.DataSet
            if isinstance(data, OversizedDataSet):
                raise DatasetTooLargeError(f"the data set is over the limit of {data.limit} bytes "
                                           f"({data.received} received)")
            if not isinstance(data, BytesIO):
                raise UnparsableDatasetError("the C-STORE request carries no data set")
            return data
        # pynetdicom wrote preamble + its own file meta + the data set; keep the data set only.
        return BytesIO(dataset_part(Path(chunked)))

