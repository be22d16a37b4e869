"""Hostile DICOM peers for the hostile-input suite: raw upper-layer PDUs (PS3.8 9.3), misbehaving SCPs.

- PDU builders: A-ASSOCIATE-RQ (type 0x01, encoded by pynetdicom), P-DATA-TF (0x04) with PDV items,
  A-RELEASE-RQ (0x05), A-ABORT (0x07), and DIMSE command sets (PS3.7 9.3.1, 9.3.5) in Implicit VR LE.
- `RawPeer`: a TCP client that speaks those PDUs byte by byte, so a test can send what no well-behaved
  SCU would (garbage, a lying length, a release in the middle of a C-STORE, one byte every 10 s).
- Misbehaving destinations: `SilentSCP` (accepts TCP, never answers) and `AbortingSCP` (aborts the first
  association at its 3rd C-STORE, answers every later one).
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from io import BytesIO

from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, PYNETDICOM_IMPLEMENTATION_UID, AllStoragePresentationContexts, evt
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import A_ASSOCIATE, ImplementationClassUIDNotification, MaximumLengthNotification
from pynetdicom.presentation import build_context

from harness.system import free_port

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"  # DICOM Application Context Name (PS3.7 A.2.1)
VERIFICATION = "1.2.840.10008.1.1"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
DEFLATED_EXPLICIT_LE = "1.2.840.10008.1.2.1.99"

ASSOCIATE_RQ, ASSOCIATE_AC, ASSOCIATE_RJ, P_DATA, RELEASE_RQ, RELEASE_RP, ABORT = 1, 2, 3, 4, 5, 6, 7


# -- PDUs (PS3.8 9.3) ---------------------------------------------------------------------------------
def pdu(pdu_type: int, body: bytes, length: int | None = None) -> bytes:
    """A PDU: type, reserved, 4-byte big-endian length (the body's unless `length` lies), body."""
    return struct.pack(">BBI", pdu_type, 0, len(body) if length is None else length) + body


def associate_rq(called_ae: str, calling_ae: str,
                 contexts: Sequence[tuple[str, Sequence[str]]] = ((CT_IMAGE_STORAGE, (ExplicitVRLittleEndian,)),),
                 max_pdu: int = 16384, length: int | None = None) -> bytes:
    """An A-ASSOCIATE-RQ PDU proposing `contexts` (abstract syntax, transfer syntaxes) as IDs 1, 3, 5, ...;
    its header announces `length` where that lies.
    """
    prim = A_ASSOCIATE()
    prim.application_context_name = APPLICATION_CONTEXT
    prim.calling_ae_title, prim.called_ae_title = calling_ae, called_ae
    cxs = []
    for i, (abstract, syntaxes) in enumerate(contexts):
        cx = build_context(abstract, list(syntaxes))
        cx.context_id = 2 * i + 1
        cxs.append(cx)
    prim.presentation_context_definition_list = cxs
    max_len, impl = MaximumLengthNotification(), ImplementationClassUIDNotification()
    max_len.maximum_length_received = max_pdu
    impl.implementation_class_uid = PYNETDICOM_IMPLEMENTATION_UID
    prim.user_information = [max_len, impl]
    rq = A_ASSOCIATE_RQ()
    rq.from_primitive(prim)
    raw = rq.encode()
    return raw if length is None else pdu(ASSOCIATE_RQ, raw[6:], length)


def pdv(context_id: int, data: bytes, *, command: bool, last: bool) -> bytes:
    """A presentation data value item: length, context ID, message control header (PS3.8 E.2), data."""
    return struct.pack(">IBB", len(data) + 2, context_id, int(command) | (int(last) << 1)) + data


def p_data(*items: bytes) -> bytes:
    """A P-DATA-TF PDU carrying the given PDV items."""
    return pdu(P_DATA, b"".join(items))


def release_rq() -> bytes:
    return pdu(RELEASE_RQ, b"\x00" * 4)


def abort_pdu(source: int = 0, reason: int = 0) -> bytes:
    """A-ABORT (source 0 = service user, PS3.8 9.3.8)."""
    return pdu(ABORT, bytes([0, 0, source, reason]))


def _implicit(elem: int, value: bytes) -> bytes:
    return struct.pack("<HHI", 0x0000, elem, len(value)) + value


def command_set(elements: Sequence[tuple[int, bytes]]) -> bytes:
    """A DIMSE command set (group 0000, Implicit VR LE, PS3.7 E.1) of raw (element, value) pairs in order,
    with its CommandGroupLength; values are taken as given, so a UID may hold any byte.
    """
    body = b"".join(_implicit(e, v) for e, v in elements)
    return _implicit(0x0000, struct.pack("<I", len(body))) + body


def _us(v: int) -> bytes:
    return struct.pack("<H", v)


def c_store_rq(sop_class: str, sop_instance: str, message_id: int = 1) -> bytes:
    """C-STORE-RQ command set (PS3.7 9.3.1.1), a data set follows."""
    return command_set([(0x0002, uid_value(sop_class)), (0x0100, _us(0x0001)), (0x0110, _us(message_id)),
                        (0x0700, _us(0)), (0x0800, _us(0x0000)), (0x1000, uid_value(sop_instance))])


def c_echo_rq(message_id: int = 1) -> bytes:
    """C-ECHO-RQ command set (PS3.7 9.3.5.1), no data set."""
    return command_set([(0x0002, uid_value(VERIFICATION)), (0x0100, _us(0x0030)), (0x0110, _us(message_id)),
                        (0x0800, _us(0x0101))])


# -- data sets ----------------------------------------------------------------------------------------
def encode_dataset(ds: Dataset, implicit: bool = False) -> bytes:
    """A data set's bytes as C-STORE carries them (no preamble, no file meta)."""
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, implicit
    write_dataset(buf, ds)
    return buf.getvalue()


def uid_value(uid: str) -> bytes:
    """A UI value padded to even length with NUL (PS3.5 6.2), whatever characters it holds."""
    raw = uid.encode("latin-1")
    return raw + b"\x00" if len(raw) % 2 else raw


# -- a raw client ------------------------------------------------------------------------------------
@dataclass
class Negotiated:
    """The answer to an A-ASSOCIATE-RQ: accepted context IDs by abstract syntax, or the rejection."""

    accepted: dict[str, int] = field(default_factory=dict)
    rejected: tuple[int, int, int] | None = None  # (result, source, reason) of A-ASSOCIATE-RJ, PS3.8 9.3.4
    max_pdu: int = 16384
    closed: bool = False  # the server closed or aborted instead of answering

    @property
    def ok(self) -> bool:
        return self.rejected is None and not self.closed and bool(self.accepted)


class RawPeer:
    """A TCP connection to a DICOM node that sends exactly the bytes a test gives it."""

    def __init__(self, port: int, host: str = "127.0.0.1", timeout_s: float = 15.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout_s)
        self.timeout_s = timeout_s
        self.max_pdu = 16384

    def __enter__(self) -> RawPeer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def send(self, data: bytes) -> bool:
        """Send bytes; False when the server has already closed the connection."""
        try:
            self.sock.sendall(data)
            return True
        except OSError:
            return False

    def _recv_exact(self, n: int) -> bytes | None:
        buf = b""
        while len(buf) < n:
            try:
                part = self.sock.recv(n - len(buf))
            except (TimeoutError, OSError):
                return None
            if not part:
                return None
            buf += part
        return buf

    def read_pdu(self, timeout_s: float | None = None) -> tuple[int, bytes] | None:
        """The next PDU (type, whole PDU bytes); None when the connection closed or timed out."""
        self.sock.settimeout(timeout_s or self.timeout_s)
        head = self._recv_exact(6)
        if head is None:
            return None
        body = self._recv_exact(struct.unpack(">I", head[2:])[0])
        return None if body is None else (head[0], head + body)

    def associate(self, called_ae: str, calling_ae: str = "HOSTILE",
                  contexts: Sequence[tuple[str, Sequence[str]]] = ((CT_IMAGE_STORAGE, (ExplicitVRLittleEndian,)),),
                  ) -> Negotiated:
        """Send an A-ASSOCIATE-RQ and read the answer."""
        self.send(associate_rq(called_ae, calling_ae, contexts))
        got = self.read_pdu()
        if got is None or got[0] == ABORT:
            return Negotiated(closed=True)
        kind, raw = got
        if kind == ASSOCIATE_RJ:
            return Negotiated(rejected=(raw[7], raw[8], raw[9]))
        ac = A_ASSOCIATE_AC()
        ac.decode(raw)
        prim = ac.to_primitive()
        by_id = {2 * i + 1: a for i, (a, _) in enumerate(contexts)}
        accepted = {by_id[cx.context_id]: cx.context_id for cx in prim.presentation_context_definition_results_list
                    if cx.result == 0}
        self.max_pdu = prim.maximum_length_received or 16384
        return Negotiated(accepted=accepted, max_pdu=self.max_pdu)

    def send_message(self, context_id: int, command: bytes, dataset: bytes | None = None) -> bool:
        """A DIMSE message as P-DATA-TF PDUs no larger than the peer's maximum (PS3.8 9.3.5)."""
        if not self.send(p_data(pdv(context_id, command, command=True, last=True))):
            return False
        if dataset is None:
            return True
        step = max(1, self.max_pdu - 12)
        for at in range(0, max(len(dataset), 1), step):
            part = dataset[at: at + step]
            if not self.send(p_data(pdv(context_id, part, command=False, last=at + step >= len(dataset)))):
                return False
        return True

    def read_status(self, timeout_s: float | None = None) -> int | None:
        """The Status (0000,0900) of the next DIMSE response; None when the association ended instead."""
        command = b""
        while True:
            got = self.read_pdu(timeout_s)
            if got is None or got[0] != P_DATA:
                return None
            raw, at = got[1], 6
            while at < len(raw):
                length, header = struct.unpack(">I", raw[at: at + 4])[0], raw[at + 5]
                command += raw[at + 6: at + 4 + length] if header & 1 else b""
                at += 4 + length
                if header & 1 and header & 2:
                    ds = read_dataset(BytesIO(command), is_implicit_VR=True, is_little_endian=True)
                    return int(ds.Status)

    def c_store(self, context_id: int, sop_class: str, sop_instance: str, dataset: bytes,
                timeout_s: float | None = None) -> int | None:
        """C-STORE one encoded data set; its status, None when the association ended instead."""
        if not self.send_message(context_id, c_store_rq(sop_class, sop_instance), dataset):
            return None
        return self.read_status(timeout_s)

    def c_echo(self, context_id: int) -> int | None:
        if not self.send_message(context_id, c_echo_rq()):
            return None
        return self.read_status()

    def release(self) -> bool:
        """A-RELEASE-RQ; True when A-RELEASE-RP came back."""
        if not self.send(release_rq()):
            return False
        got = self.read_pdu()
        return got is not None and got[0] == RELEASE_RP

    def abort(self) -> None:
        self.send(abort_pdu())
        self.close()

    def wait_closed(self, timeout_s: float) -> float | None:
        """Seconds until the server closed (or aborted) the connection, None if it is still open."""
        t0 = time.monotonic()
        self.sock.settimeout(0.2)
        while time.monotonic() - t0 < timeout_s:
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return time.monotonic() - t0
            if not data or data[0] == ABORT:
                return time.monotonic() - t0
        return None

    def trickle(self, data: bytes, interval_s: float, timeout_s: float) -> float | None:
        """Send `data` one byte every `interval_s` (a slow peer); seconds until the server dropped it."""
        t0 = time.monotonic()
        for byte in data:
            if not self.send(bytes([byte])):
                return time.monotonic() - t0
            left = timeout_s - (time.monotonic() - t0)
            if left <= 0:
                return None
            closed = self.wait_closed(min(interval_s, left))
            if closed is not None:
                return time.monotonic() - t0
        return None


def idle_connections(port: int, n: int, host: str = "127.0.0.1") -> list[socket.socket]:
    """`n` TCP connections that never send a byte (each the caller closes)."""
    socks = []
    for _ in range(n):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.settimeout(5)
        try:
            s.connect((host, port))
        except OSError:
            s.close()
            continue
        socks.append(s)
    return socks


# -- misbehaving destinations ------------------------------------------------------------------------
class SilentSCP:
    """A destination that accepts TCP connections and never answers a byte (an SCP hung on its disk)."""

    def __init__(self, ae_title: str = "SILENT") -> None:
        self.ae_title = ae_title
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.connections: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, name="silent-scp", daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        self.listener.settimeout(0.2)
        while not self._stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections.append(conn)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        for s in [self.listener, *self.connections]:
            s.close()


@dataclass
class Received:
    association: int
    sop_class: str
    sop_instance: str


class AbortingSCP:
    """A pynetdicom Storage SCP that aborts its first association when the 3rd C-STORE arrives (after
    acknowledging two), and acknowledges everything on later associations.
    """

    def __init__(self, ae_title: str = "FLAKY", abort_at: int = 3) -> None:
        self.ae_title, self.abort_at = ae_title, abort_at
        self.port = free_port()
        self.acknowledged: list[Received] = []
        self.aborted: list[Received] = []
        self._associations: dict[int, int] = {}
        self._lock = threading.Lock()
        self.ae = AE(ae_title=ae_title)
        for cx in AllStoragePresentationContexts:
            self.ae.add_supported_context(cx.abstract_syntax)
        self.ae.network_timeout = self.ae.acse_timeout = self.ae.dimse_timeout = 10
        self.server = self.ae.start_server(("127.0.0.1", self.port), block=False,
                                           evt_handlers=[(evt.EVT_C_STORE, self._on_store)])

    def _on_store(self, event: evt.Event) -> int:
        with self._lock:
            n_assoc = self._associations.setdefault(id(event.assoc), len(self._associations) + 1)
            got = Received(n_assoc, str(event.request.AffectedSOPClassUID),
                           str(event.request.AffectedSOPInstanceUID))
            in_this = sum(r.association == n_assoc for r in self.acknowledged) + 1
            if n_assoc == 1 and in_this >= self.abort_at:
                self.aborted.append(got)
                event.assoc.abort()
                return 0xA700
            self.acknowledged.append(got)
        return 0x0000

    def stop(self) -> None:
        self.server.shutdown()

