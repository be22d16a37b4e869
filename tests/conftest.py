"""Shared fixtures: a free port, system tools (a missing one skips the test), a small model trained here."""

from __future__ import annotations

from collections.abc import Generator
from pathlib import Path

import pytest

from harness.system import ToolMissing, free_port, system_tool


@pytest.fixture
def port() -> int:
    return free_port()


def require_tool(name: str) -> str:
    """A system tool (dcmtk, dicom3tools, Orthanc), never the virtualenv's same-named pynetdicom script."""
    try:
        return system_tool(name)
    except ToolMissing as exc:
        pytest.skip(str(exc))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, object, object]:
    """A harness call that needs a tool which is not installed skips the test instead of failing it."""
    try:
        return (yield)
    except ToolMissing as exc:
        pytest.skip(str(exc))


@pytest.hookimpl(wrapper=True)
def pytest_fixture_setup(fixturedef: pytest.FixtureDef,
                         request: pytest.FixtureRequest) -> Generator[None, object, object]:
    """The same for a fixture that starts a tool."""
    try:
        return (yield)
    except ToolMissing as exc:
        pytest.skip(str(exc))


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
