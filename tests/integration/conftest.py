"""Fixtures for the end-to-end tests: a synthetic study, the models the gateway serves, a dcmtk destination."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.dcmtk import StoreSCP, start_storescp
from harness.gateway import REPO


@pytest.fixture(scope="session")
def chest_study(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    """A 100-slice 512x512 synthetic chest CT with two nodules (LUNA16-style annotations)."""
    from training.synthetic import write_chest_ct_study

    out = tmp_path_factory.mktemp("chest100")
    return write_chest_ct_study(out, seed=11, slices=100, nodules=2, rows=512)


@pytest.fixture(scope="session")
def gateway_models(request: pytest.FixtureRequest) -> Path:
    """The shipped models/ when the lung model is there, else a model trained a few steps here."""
    if (REPO / "models" / "lung_nodule_ct" / "metadata.json").is_file():
        return REPO / "models"
    return request.getfixturevalue("smoke_models_dir")


@pytest.fixture
def storescp_dest(tmp_path: Path) -> Iterator[StoreSCP]:
    """dcmtk storescp (AE title DEST) as an independent destination, accepting every storage SOP class."""
    scp = start_storescp(tmp_path / "dest", "DEST")
    yield scp
    scp.stop()
