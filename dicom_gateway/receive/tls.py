"""TLS contexts for DICOM (PS3.15 Annex B, the BCP 195 profiles: TLS 1.2 or later).

`server_context` is the Storage SCP's TLS listener; `client_context` is what the sender presents to a
destination with `tls: true`. Both come from the one `tls:` block of the settings: this node's
certificate and key, and `ca_file`, the CAs trusted for peers' certificates.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from dicom_gateway.errors import ConfigError
from dicom_gateway.settings_security import TlsSettings

MINIMUM_VERSION = ssl.TLSVersion.TLSv1_2


def _readable(path: Path, key: str) -> str:
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise ConfigError(f"{key}: cannot read {path} ({exc.strerror or exc})") from exc
    return str(path)


def _load_identity(ctx: ssl.SSLContext, tls: TlsSettings) -> None:
    cert = _readable(tls.cert_file, "tls.cert_file")
    key = _readable(tls.key_file, "tls.key_file")
    try:
        ctx.load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        raise ConfigError(f"tls.cert_file / tls.key_file: {cert} and {key} are not a PEM certificate and its "
                          f"unencrypted private key ({exc.reason or exc})") from exc


def _load_cas(ctx: ssl.SSLContext, tls: TlsSettings) -> None:
    if tls.ca_file is None:
        return
    ca = _readable(tls.ca_file, "tls.ca_file")
    try:
        ctx.load_verify_locations(cafile=ca)
    except ssl.SSLError as exc:
        raise ConfigError(f"tls.ca_file: {ca} is not a PEM CA bundle ({exc.reason or exc})") from exc


def server_context(tls: TlsSettings) -> ssl.SSLContext:
    """The SCP's context: presents tls.cert_file; client certificates per `require_client_cert`.

    require_client_cert: a client without a certificate signed by ca_file fails the handshake
    (CERT_REQUIRED). Otherwise a certificate the client presents is verified against ca_file when
    there is one (CERT_OPTIONAL), and none is asked for without a ca_file (CERT_NONE).
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = MINIMUM_VERSION
    _load_identity(ctx, tls)
    _load_cas(ctx, tls)
    if tls.require_client_cert:
        ctx.verify_mode = ssl.CERT_REQUIRED
    elif tls.ca_file is not None:
        ctx.verify_mode = ssl.CERT_OPTIONAL
    else:
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def client_context(tls: TlsSettings) -> ssl.SSLContext:
    """The sender's context: verifies the destination's certificate and host name, presents ours.

    The peer is verified against tls.ca_file, or against the system's CAs when there is none.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED and check_hostname
    ctx.minimum_version = MINIMUM_VERSION
    _load_identity(ctx, tls)
    if tls.ca_file is None:
        ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    else:
        _load_cas(ctx, tls)
    return ctx

