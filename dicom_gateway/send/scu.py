"""C-STORE SCU (PS3.4 Annex B, PS3.7 9.1.1): send Part 10 files to a Storage SCP.

`send_paths` is `dxgate send` (like dcmtk `storescu +sd`): one association for all the files named.
`store_datasets_or_files` is what the result sender uses: one association per batch, a status per
file, DeliveryError when the association cannot be established or is lost.

Presentation contexts are proposed for the (SOP class, transfer syntax) pairs actually present; a
compressed file is proposed in its own transfer syntax only (sent as-is, never transcoded), an
uncompressed one also with the other uncompressed syntaxes. At most 128 contexts fit one association
(PS3.8 9.3.2.2: odd context IDs 1-255); more pairs than that are spread over further associations.

Over TLS (PS3.15 Annex B) the peer's certificate is verified against `tls.ca_file` (or the system's
CAs) and its host name checked; this node presents `tls.cert_file`.
"""

from __future__ import annotations

import logging
import os
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, build_context, evt
from pynetdicom.association import Association
from pynetdicom.presentation import PresentationContext

from dicom_gateway.errors import ConfigError, DeliveryError
from dicom_gateway.receive.scp import set_tcp_nodelay
from dicom_gateway.receive.tls import client_context
from dicom_gateway.settings import Destination
from dicom_gateway.settings_security import TlsSettings

log = logging.getLogger("dxgate.scu")

MAX_CONTEXTS = 128
_UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)


class AssociationFailedError(DeliveryError):
    """The association could not be established (peer down, rejected, timed out): the destination is
    unreachable for now, so other deliveries to it need not be tried in the same pass."""


def is_success(status: int | None) -> bool:
    """Success or warning (PS3.4 B.2.3: 0xB000, 0xB006, 0xB007; PS3.7 C: 0x0001)."""
    return status is not None and (status == 0x0000 or status == 0x0001 or 0xB000 <= status <= 0xBFFF)


@dataclass
class SendReport:
    """Outcome of `send_paths`: counts and the status of every file (None = no response)."""

    sent: int = 0
    failed: int = 0
    skipped: list[Path] = field(default_factory=list)  # not readable as DICOM Part 10
    statuses: list[tuple[Path, int | None]] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"sent {self.sent}, failed {self.failed}, skipped {len(self.skipped)} (not DICOM)"]
        lines += [f"  0x{s:04X} {p}" if s is not None else f"  no response {p}"
                  for p, s in self.statuses if not is_success(s)]
        return "\n".join(lines)


@dataclass(frozen=True)
class _File:
    path: Path
    sop_class: str
    transfer_syntax: str


def _read_identity(path: Path) -> _File:
    """SOP class and transfer syntax from the file meta (PS3.10 7.1); DeliveryError if unreadable."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID"])
        sop_class = ds.file_meta.get("MediaStorageSOPClassUID") or ds.get("SOPClassUID")
        ts = ds.file_meta.TransferSyntaxUID
    except Exception as exc:
        raise DeliveryError(f"{path} is not a readable DICOM Part 10 file: {exc}") from exc
    if not sop_class:
        raise DeliveryError(f"{path} has no SOP Class UID")
    return _File(path, str(sop_class), str(ts))


def _contexts_for(files: Sequence[_File]) -> list[list[PresentationContext]]:
    """Presentation contexts for the pairs present, in groups of ≤ 128 (one group per association)."""
    pairs: dict[tuple[str, str], None] = {}
    for f in files:
        pairs.setdefault((f.sop_class, f.transfer_syntax), None)
    contexts: list[PresentationContext] = []
    for sop_class, ts in pairs:
        syntaxes = [ts]
        if not UID(ts).is_compressed:
            syntaxes += [t for t in _UNCOMPRESSED if t != ts]
        contexts.append(build_context(sop_class, syntaxes))
    return [contexts[i:i + MAX_CONTEXTS] for i in range(0, len(contexts), MAX_CONTEXTS)] or [[]]


def _associate(contexts: list[PresentationContext], host: str, port: int, called_ae: str, calling_ae: str,
               max_pdu: int, timeout_s: float, tls_context: ssl.SSLContext | None = None) -> Association:
    ae = AE(ae_title=calling_ae)
    ae.requested_contexts = contexts
    ae.maximum_pdu_size = max_pdu
    ae.connection_timeout = ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    tls_args = (tls_context, host) if tls_context is not None else None
    started = time.monotonic()
    assoc = ae.associate(host, port, ae_title=called_ae, max_pdu=max_pdu, tls_args=tls_args,
                         evt_handlers=[(evt.EVT_CONN_OPEN, set_tcp_nodelay)])
    if not assoc.is_established:
        why = "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "not established"
        if not assoc.is_rejected and time.monotonic() - started >= 0.9 * timeout_s:
            hint = f"no answer within {timeout_s:g} s (sender.timeout_s): the peer accepted TCP but did not respond"
        elif tls_context is not None:
            hint = "peer down, TLS handshake failed (certificate not trusted?), unknown AE title or no accepted context"
        else:
            hint = "peer down, unknown AE title or no accepted context"
        raise AssociationFailedError(f"association to {called_ae}@{host}:{port}{' (TLS)' if tls_args else ''} "
                                     f"{why} ({hint})")
    return assoc


def _send_one(assoc: Association, f: _File) -> int | None:
    """C-STORE one file; the data set is read with its pixel data and sent in its own transfer syntax."""
    ds: Dataset = pydicom.dcmread(f.path)
    rsp = assoc.send_c_store(ds)
    return int(rsp.Status) if rsp is not None and "Status" in rsp else None


def _store_files(files: Sequence[_File], host: str, port: int, called_ae: str, calling_ae: str,
                 max_pdu: int, timeout_s: float, tls_context: ssl.SSLContext | None = None,
                 on_stored: Callable[[Path, int], None] | None = None) -> tuple[list[tuple[Path, int | None]], bool]:
    """Send files over as few associations as the 128-context limit allows.

    Returns the (path, status) of every file (None: no response) and whether an association was lost
    mid-way (the files after that point are reported with None). Raises DeliveryError when an
    association cannot be established. `on_stored(path, status)` is called right after each successful
    (or warning) C-STORE response.
    """
    results: list[tuple[Path, int | None]] = []
    lost = False
    for group in _contexts_for(files):
        wanted = {(str(cx.abstract_syntax), str(cx.transfer_syntax[0])) for cx in group}
        batch = [f for f in files if (f.sop_class, f.transfer_syntax) in wanted]
        if not batch:
            continue
        if lost:
            results += [(f.path, None) for f in batch]
            continue
        assoc = _associate(group, host, port, called_ae, calling_ae, max_pdu, timeout_s, tls_context)
        try:
            for f in batch:
                if lost:
                    results.append((f.path, None))
                    continue
                try:
                    status = _send_one(assoc, f)
                except Exception as exc:  # unreadable now, or no accepted context for it
                    log.warning("C-STORE not sent", extra={"reason": f"{f.path.name}: {type(exc).__name__}: {exc}"})
                    status = None
                lost = not assoc.is_established
                results.append((f.path, status))
                if on_stored is not None and status is not None and is_success(status):
                    on_stored(f.path, status)
        finally:
            if assoc.is_established:
                assoc.release()
    return results, lost


def store_datasets_or_files(paths: Sequence[Path], destination: Destination, calling_ae: str,
                            timeout_s: float, *, tls: TlsSettings | None = None,
                            on_stored: Callable[[Path, int], None] | None = None) -> list[tuple[Path, int]]:
    """C-STORE files to a destination in one association; the status of each file, in order.

    A destination with `tls: true` is sent to over TLS with `tls` (the settings' block: our certificate,
    the CAs trusted for the destination's); ConfigError when it is missing. `on_stored(path, status)`
    is called right after each file's successful C-STORE response (an exception from it stops the
    send). A file without a response is reported as 0x0110 (processing failure). Raises DeliveryError
    when a file is unreadable or the association cannot be established, is rejected or is aborted.
    """
    files = [_read_identity(Path(p)) for p in paths]
    if not files:
        return []
    tls_context = _tls_context_for(destination, tls)
    results, lost = _store_files(files, destination.host, destination.port, destination.ae_title, calling_ae,
                                 0, timeout_s, tls_context, on_stored)
    if lost:
        raise DeliveryError(f"association to {destination.name} ({destination.ae_title}@{destination.host}:"
                            f"{destination.port}) was aborted during C-STORE")
    return [(p, 0x0110 if s is None else s) for p, s in results]


def _tls_context_for(destination: Destination, tls: TlsSettings | None) -> ssl.SSLContext | None:
    if not destination.tls:
        return None
    if tls is None:
        raise ConfigError(f"destinations: {destination.name} has tls: true but there is no tls block "
                          "(cert_file, key_file, ca_file)")
    return client_context(tls)


def send_paths(paths: Sequence[Path], host: str, port: int, called_ae: str, calling_ae: str = "DXGATE_SCU",
               max_pdu: int = 0, timeout_s: float = 30.0, *, tls: TlsSettings | None = None) -> SendReport:
    """C-STORE every readable DICOM Part 10 file among `paths` (files, or folders searched recursively).

    With `tls`, over TLS: the peer verified against tls.ca_file, tls.cert_file presented.

    Files that are not DICOM are listed in `skipped`. Raises FileNotFoundError for a path that does not
    exist and DeliveryError when the peer cannot be associated with; failures of single files are counted
    in the report.
    """
    report = SendReport()
    files: list[_File] = []
    for path in sorted(p for folder in paths for p in _walk(Path(folder))):
        try:
            files.append(_read_identity(path))
        except DeliveryError:
            report.skipped.append(path)
    if files:
        report.statuses, _lost = _store_files(files, host, port, called_ae, calling_ae, max_pdu, timeout_s,
                                              client_context(tls) if tls is not None else None)
    report.sent = sum(1 for _, s in report.statuses if is_success(s))
    report.failed = len(report.statuses) - report.sent
    log.info("files sent", extra={"count": report.sent, "destination": f"{called_ae}@{host}:{port}",
                                  "reason": f"{report.failed} failed, {len(report.skipped)} skipped"})
    return report


def _walk(folder: Path) -> list[Path]:
    if folder.is_file():
        return [folder]
    if not folder.is_dir():
        raise FileNotFoundError(f"no such file or folder: {folder}")
    out = []
    for root, _dirs, names in os.walk(folder):
        out += [Path(root) / n for n in names]
    return out
