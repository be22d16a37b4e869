"""Shared fixtures: free ports, tool availability, and a small real model trained through `training`."""

from __future__ import annotations

import os
import shutil
import socket
import sys
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def port() -> int:
    return free_port()


def require_tool(name: str) -> str:
    """A system tool (dcmtk, dicom3tools, Orthanc), never the virtualenv's same-named pynetdicom script."""
    venv_bin = os.path.dirname(sys.executable)
    dirs = [d for d in os.environ.get("PATH", "").split(os.pathsep) if d and os.path.abspath(d) != venv_bin]
    path = shutil.which(name, path=os.pathsep.join([*dirs, "/usr/bin", "/usr/sbin", "/usr/local/bin"]))
    if path is None:
        pytest.skip(f"{name} is not installed (the CI script installs it)")
    return path


@pytest.fixture(scope="session")
def smoke_models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A models/ folder with a lung-nodule model trained a few steps by the project's own pipeline.

    The shipped models in models/ are preferred by the end-to-end tests when present; this one
    proves the gateway serves whatever `training` registers.
    """
    from training.smoke_model import build_smoke_model

    models = tmp_path_factory.mktemp("models")
    build_smoke_model(models, name="lung_nodule_ct", steps=20, seed=0)
    return models
