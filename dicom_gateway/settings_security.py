"""The security and resource-limit blocks of the settings: DICOM TLS, the AE allow-list, API tokens, limits.

Key names are a contract (docs/security.md documents each): `tls: {port, cert_file, key_file, ca_file,
require_client_cert}`, a destination's `tls: true`, `allowed_calling_aes` (an AE title, or one bound to
host addresses), `api_tokens: [{name, role, sha256}]`.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

AE_TITLE_PATTERN = r"^[\x20-\x5b\x5d-\x7e]{1,16}$"  # PS3.5 6.2: AE, 16 chars, no backslash


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TlsSettings(_Strict):
    """The Storage SCP's TLS listener (PS3.15 Annex B: TLS 1.2 or later) and the sender's client identity."""

    port: int = Field(ge=1, le=65535)
    """TLS port; the plain `dicom_port` listens beside it unless `dicom_port: 0`."""
    cert_file: Path
    """PEM certificate (chain) this node presents, as server and as client to TLS destinations."""
    key_file: Path
    ca_file: Path | None = None
    """PEM CA bundle trusted for peers' certificates: clients (mutual TLS) and TLS destinations."""
    require_client_cert: bool = False
    """Mutual TLS: refuse a client that presents no certificate signed by `ca_file`."""


class AllowedAE(_Strict):
    """A calling AE title, optionally bound to the host addresses (or networks) it may call from."""

    ae_title: str = Field(pattern=AE_TITLE_PATTERN)
    hosts: list[str] = Field(default_factory=list)
    """IP addresses or networks (10.0.0.5, 10.0.1.0/24); empty = any host."""

    @field_validator("hosts")
    @classmethod
    def _networks(cls, v: list[str]) -> list[str]:
        for host in v:
            try:
                ipaddress.ip_network(host, strict=False)
            except ValueError as exc:
                raise ValueError(f"{host!r} is not an IP address or network") from exc
        return v

    def allows(self, ae_title: str, address: str) -> bool:
        if ae_title != self.ae_title:
            return False
        if not self.hosts:
            return True
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in ipaddress.ip_network(h, strict=False) for h in self.hosts)


Role = Literal["read", "operate", "admin"]
"""read: GET endpoints; operate: also replay / re-run; admin: everything."""


class ApiToken(_Strict):
    """One bearer token of the HTTP API, stored as the SHA-256 of the token (never the token itself)."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.@-]{1,64}$")
    role: Role
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class Limits(_Strict):
    """Caps on what one peer or one study may make dxgate hold (memory, disk, time)."""

    max_dataset_mb: float = Field(default=1024, gt=0)
    """Bytes of one received data set (as received, or after inflating a Deflated one); more: 0xA700."""
    max_associations_per_ae: int = Field(default=8, ge=1)
    max_associations_per_host: int = Field(default=8, ge=1)
    max_association_seconds: float = Field(default=3600, gt=0)
    """An association open longer than this is aborted (its acknowledged instances stay)."""
    max_slices: int = Field(default=3000, ge=2)
    max_voxels: int = Field(default=600_000_000, ge=1)
    """Voxels of one series' volume, checked from the headers before any pixel is decoded."""
    max_model_grid_voxels: int = Field(default=400_000_000, ge=1)
    """Voxels of the volume resampled to a model's grid, checked before resampling."""

    @property
    def max_dataset_bytes(self) -> int:
        return int(self.max_dataset_mb * 1024 * 1024)


def is_loopback(address: str) -> bool:
    """True for 127.0.0.0/8, ::1 and 'localhost'."""
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False
