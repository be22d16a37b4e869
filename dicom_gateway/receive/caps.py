"""Bounded receive: the largest PDU and the largest data set one peer can make the SCP hold.

pynetdicom (3.0) reads whatever length a PDU header announces and assembles a data set from any number
of P-DATA fragments. Two per-association guards are installed when a connection opens
(`install_receive_caps` wraps the AE's `make_server`, so every server the AE makes gets them; nothing
in pynetdicom is patched globally):

- `CappedPDUReader` replaces the association's `DULServiceProvider._read_pdu_data`: a P-DATA-TF PDU
  whose announced length exceeds the negotiated maximum (`max_pdu`, the Maximum Length we announce,
  PS3.8 D.1) and any other PDU over `CONTROL_PDU_MAX` is treated as an invalid PDU (Evt19): the
  association is aborted with an A-ABORT (PS3.8 9.2, AA-1 / AA-8) before a byte of its body is read.
- `DatasetCap` wraps the association's `DIMSEServiceProvider.receive_primitive`: once the data set of
  one message passes `limits.max_dataset_bytes`, what was assembled is freed and the rest of its
  fragments are dropped; the C-STORE request is still delivered, with an `OversizedDataSet` that the
  Storage SCP answers 0xA700 (out of resources, PS3.4 B.2.3). The association stays usable.
"""

from __future__ import annotations

import contextlib
import logging
import struct
import time
from collections.abc import Callable
from io import BytesIO
from pathlib import Path
from typing import Any

from pynetdicom import AE, evt
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import DIMSEMessage
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu_primitives import P_DATA

from dicom_gateway.settings import Settings

log = logging.getLogger("dxgate.scp")

P_DATA_TF = 0x04
PDU_TYPES = frozenset({0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07})
"""A-ASSOCIATE-RQ/AC/RJ, P-DATA-TF, A-RELEASE-RQ/RP, A-ABORT (PS3.8 9.3)."""
CONTROL_PDU_MAX = 1 << 20
"""Largest PDU other than P-DATA-TF accepted (an A-ASSOCIATE-RQ with 128 contexts is well under this)."""
DRAIN_MAX = 4 << 20
"""After refusing a PDU, at most this many of its bytes are read (and dropped) before closing."""
_HEADER = struct.Struct(">BBL")  # PDU type, reserved, PDU length (PS3.8 9.3.1)


class OversizedDataSet(BytesIO):
    """Stands in for a data set that passed the cap: empty, with the number of bytes received for it."""

    def __init__(self, received: int, limit: int) -> None:
        super().__init__()
        self.received = received
        self.limit = limit


class CappedPDUReader:
    """`_read_pdu_data` for one association's DUL: the length check comes before the body is read.

    Mirrors pynetdicom 3.0's `DULServiceProvider._read_pdu_data`, events included (Evt17 transport
    closed, Evt19 invalid PDU), with the announced length checked against the caps. After an invalid
    PDU (unknown type, over a cap, undecodable) nothing more is parsed: what follows is drained and
    the connection closed.
    """

    def __init__(self, dul: DULServiceProvider, max_pdu: int, read_timeout_s: float = 60.0) -> None:
        self.dul = dul
        self.max_pdu = max_pdu
        self.read_timeout_s = read_timeout_s
        self.refused = False
        self.drained = 0

    def limit(self, pdu_type: int) -> int:
        return self.max_pdu if pdu_type == P_DATA_TF else CONTROL_PDU_MAX

    def __call__(self) -> None:
        dul, sock = self.dul, self.dul.socket
        if sock is None:
            dul.event_queue.put("Evt17")
            return
        if self.refused:  # after our A-ABORT (Sta13): discard what the peer still sends, then close
            self._drain()
            return
        try:
            header = self._recv(6)
        except TimeoutError:
            self._too_slow(6)
            return
        except OSError:
            dul.event_queue.put("Evt17")
            return
        if len(header) != 6:
            dul.event_queue.put("Evt17")
            return
        pdu_type, _, length = _HEADER.unpack(bytes(header))
        if pdu_type not in PDU_TYPES:
            self.refused = True
            log.warning("unknown PDU type received, association aborted", extra={"reason": f"type 0x{pdu_type:02X}"})
            dul.event_queue.put("Evt19")
            return
        if length > self.limit(pdu_type):
            self.refused = True
            log.warning("PDU over the size limit, association aborted",
                        extra={"reason": f"PDU type 0x{pdu_type:02X} announces {length} bytes, "
                                         f"the limit is {self.limit(pdu_type)}"})
            dul.event_queue.put("Evt19")
            return
        try:
            body = self._recv(length)
        except TimeoutError:
            self._too_slow(length)
            return
        except OSError:
            dul.event_queue.put("Evt17")
            return
        if len(body) != length:  # the peer closed mid-PDU
            dul.event_queue.put("Evt17")
            return
        try:
            pdu, event = dul._decode_pdu(header + body)
        except Exception as exc:  # a malformed PDU body: invalid PDU, as pynetdicom does
            self.refused = True
            log.warning("undecodable PDU, association aborted", extra={"reason": type(exc).__name__})
            dul.event_queue.put("Evt19")
            return
        dul.event_queue.put(event)
        dul._recv_pdu.put(pdu)

    def _recv(self, n: int) -> bytes:
        """`n` bytes (fewer if the peer closes) within `read_timeout_s`, whatever pace the peer keeps.

        pynetdicom's own read blocks until the bytes come, however slowly: a peer sending one byte
        every few seconds would hold its connection and thread forever. TimeoutError past the deadline.
        """
        assert self.dul.socket is not None
        raw = self.dul.socket.socket
        assert raw is not None
        deadline = time.monotonic() + self.read_timeout_s
        before = raw.gettimeout()
        buf = bytearray()
        try:
            while len(buf) < n:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError
                raw.settimeout(remaining)
                chunk = raw.recv(min(n - len(buf), 1 << 16))
                if not chunk:
                    break
                buf += chunk
        finally:
            with contextlib.suppress(OSError):
                raw.settimeout(before)
        return bytes(buf)

    def _too_slow(self, wanted: int) -> None:
        log.warning("peer too slow, connection closed",
                    extra={"reason": f"{wanted} bytes of a PDU not received within {self.read_timeout_s:g} s "
                                     "(network_timeout_s)"})
        assert self.dul.socket is not None
        self.dul.socket.close()
        self.dul.event_queue.put("Evt17")

    def _drain(self) -> None:
        """Read and drop bytes already sent (so our A-ABORT is not lost to a TCP reset), up to a budget."""
        sock = self.dul.socket
        assert sock is not None
        raw = sock.socket
        try:
            chunk = raw.recv(65536) if raw is not None else b""
        except (OSError, TimeoutError):
            chunk = b""
        self.drained += len(chunk)
        if not chunk or self.drained > DRAIN_MAX:
            sock.close()


class DatasetCap:
    """`receive_primitive` for one association's DIMSE provider, with the data set bytes capped."""

    def __init__(self, dimse: DIMSEServiceProvider, max_bytes: int) -> None:
        self.dimse = dimse
        self.max_bytes = max_bytes
        self._receive: Callable[[Any], None] = dimse.receive_primitive

    def __call__(self, primitive: Any) -> None:
        if not isinstance(primitive, P_DATA):
            self._receive(primitive)
            return
        # One PDV at a time, so the message a data fragment belongs to exists when it is checked.
        for context_id, data in primitive.presentation_data_value_list:
            if data and not data[0] & 1:
                if self.dimse.message is None:  # data before any command: bounded all the same
                    self.dimse.message = DIMSEMessage()
                data = self._bounded(data)
            single = P_DATA()
            single.presentation_data_value_list = [[context_id, bytes(data)]]
            self._receive(single)

    def _bounded(self, fragment: bytes) -> bytes:
        """The fragment, or only its control header once the message's data set is over the cap."""
        msg = self.dimse.message
        assert msg is not None
        current = msg.data_set
        if isinstance(current, OversizedDataSet):
            current.received += len(fragment) - 1
            return fragment[:1]
        held = _held(msg)
        if held + len(fragment) - 1 <= self.max_bytes:
            return fragment
        log.warning("data set over the size limit, its remaining fragments are dropped",
                    extra={"reason": f"more than {self.max_bytes} bytes"})
        if msg._data_set_file:  # remove the temp file
            path = Path(msg._data_set_file.name)
            msg._data_set_file.close()
            with contextlib.suppress(OSError):
                path.unlink()
            msg._data_set_file = None
            msg._data_set_path = None
        msg.data_set = OversizedDataSet(held + len(fragment) - 1, self.max_bytes)  # frees what was held
        return fragment[:1]


def _held(msg: DIMSEMessage) -> int:
    """Data set bytes a message holds so far (in memory, or in pynetdicom's STORE_RECV_CHUNKED_DATASET file)."""
    if msg._data_set_file:
        return int(msg._data_set_file.tell())
    return msg.data_set.tell() if msg.data_set is not None else 0


def cap_association(event: evt.Event, settings: Settings) -> None:
    """EVT_CONN_OPEN handler (runs before the association's DUL starts): install both guards."""
    assoc = event.assoc
    assoc.dul._read_pdu_data = CappedPDUReader(  # type: ignore[method-assign]
        assoc.dul, settings.max_pdu, settings.network_timeout_s)
    assoc.dimse.receive_primitive = DatasetCap(  # type: ignore[method-assign]
        assoc.dimse, settings.limits.max_dataset_bytes)


def install_receive_caps(ae: AE, settings: Settings) -> None:
    """Make every association server `ae` makes (start_server, make_server) cap its associations."""
    make_server = ae.make_server
    handler = (evt.EVT_CONN_OPEN, cap_association, [settings])

    def capped_make_server(*args: Any, **kwargs: Any) -> Any:
        kwargs["evt_handlers"] = [*(kwargs.get("evt_handlers") or []), handler]
        return make_server(*args, **kwargs)

    ae.make_server = capped_make_server  # type: ignore[method-assign]
