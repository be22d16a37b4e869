"""Shared fixtures: a free port, system tools (a missing one skips the test), a small model trained here."""

from __future__ import annotations

from collections.abc import Generator
from pathlib import Path

import pytest

from harness.system import ToolMissing, free_port, system_tool


@pytest.fixture
def port() -> int:
    return free_port()


# The harness's own lookup: a missing tool raises ToolMissing, which the hooks below turn into a skip.
require_tool = system_tool


@pytest.hookimpl(wrapper=True)
def _skip_when_a_tool_is_missing() -> Generator[None, None, None]:
    """A test, or any fixture it sets up, that needs a tool which is not installed is skipped, not failed.

    Wrapping the setup phase (not each fixture's setup) also skips the later tests of a module- or
    session-scoped fixture, whose cached ToolMissing is raised again outside `pytest_fixture_setup`.
    """
    try:
        yield
    except ToolMissing as exc:
        pytest.skip(str(exc))


pytest_runtest_setup = pytest_runtest_call = _skip_when_a_tool_is_missing


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
