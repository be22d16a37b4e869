"""Fixtures shared by the gateway's tests: Storage SCPs on free loopback ports."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from dicom_gateway.receive.scp import StorageSCP
from dicom_gateway.receive.spool import Spool
from dicom_gateway.settings import Settings
from dicom_gateway.store import Store
from harness.system import free_port


@pytest.fixture
def scp_factory(tmp_path: Path) -> Iterator[Callable[..., StorageSCP]]:
    """start(**settings) -> a running StorageSCP on a free port (data under tmp_path/var, 5 s network timeout);
    every one started is stopped after the test."""
    started: list[StorageSCP] = []

    def start(**overrides: object) -> StorageSCP:
        settings = Settings(data_dir=tmp_path / "var", **{"network_timeout_s": 5, "dicom_port": free_port(),
                                                          **overrides})
        scp = StorageSCP(settings, Store(settings.db_path), Spool(settings.spool_dir, fsync=False, min_free_bytes=0))
        scp.start()
        started.append(scp)
        return scp

    yield start
    for scp in started:
        scp.stop()
