"""The docs say what the software does: their commands run, their links resolve, the model pages match the cards."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from dxgate.main import build_parser
from inference.model_doc import card_markdown, model_dirs
from tests.doc_blocks import REPO, commands, newcomer_dir, sh_blocks, venv_env

DOCS = sorted([REPO / "README.md", REPO / "datasets" / "README.md", *(REPO / "docs").rglob("*.md")])
# Commands quick enough to run here; the others (train, evaluate, serve, jobs, bench, make, docker) are parsed only,
# and the README's "Try it" block runs against a real gateway in tests/integration/test_readme.py.
RUNNABLE = {"config", "models", "rules", "synth", "token", "--help", "--version"}
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def _dxgate_commands() -> list[tuple[str, list[str]]]:
    return [(f"{doc.relative_to(REPO)} ({heading})", words) for doc in DOCS for heading, block in sh_blocks(doc)
            for words in commands(block) if words[0] == "dxgate"]


def _runnable_blocks() -> list[tuple[str, str]]:
    """(where, block) for the blocks made only of quick `dxgate` commands (redirections allowed)."""
    return [(f"{doc.relative_to(REPO)} ({heading})", block) for doc in DOCS for heading, block in sh_blocks(doc)
            if heading != "Try it" and commands(block)
            and all(w[0] == "dxgate" and w[1] in RUNNABLE for w in commands(block))]


def test_model_pages_are_generated_from_the_cards() -> None:
    pages = REPO / "docs" / "models"
    folders = model_dirs(REPO / "models")
    assert folders, "no model cards"
    for folder in folders:
        page = pages / f"{folder.name}.md"
        assert page.is_file(), f"{page.relative_to(REPO)} is missing: run `dxgate models doc`"
        assert page.read_text(encoding="utf-8") == card_markdown(folder, pages), \
            f"{page.relative_to(REPO)} differs from its card: run `dxgate models doc`"
    assert {p.stem for p in pages.glob("*.md")} == {f.name for f in folders}, "a page without a card"


def test_every_documented_dxgate_command_parses() -> None:
    found = _dxgate_commands()
    assert len(found) >= 5, found
    for where, words in found:
        try:
            args = build_parser().parse_args(words[1:])
        except SystemExit as exc:
            if exc.code == 0 and words[1] in RUNNABLE:  # --help / --version
                continue
            raise AssertionError(f"{where}: `{' '.join(words)}` does not parse") from exc
        if words[1] == "train":
            assert (REPO / args.config).is_file(), f"{where}: {args.config} is not in the repository"


@pytest.mark.parametrize(("where", "block"), [pytest.param(w, b, id=w) for w, b in _runnable_blocks()])
def test_documented_blocks_run(where: str, block: str, tmp_path: Path) -> None:
    work = newcomer_dir(tmp_path)
    res = subprocess.run(["bash", "-e", "-c", block], cwd=work, env=venv_env(), capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, f"{where}:\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}"
    for page in (work / "docs" / "models").glob("*.md"):  # `dxgate models doc` run as the docs show it
        assert page.read_text() == (REPO / "docs" / "models" / page.name).read_text(), page.name


def test_the_readme_blocks_that_run_here_are_found() -> None:
    names = {where for where, _ in _runnable_blocks()}
    assert {"README.md (Configuration)", "README.md (Models)"} <= names, names


def test_links_resolve() -> None:
    broken = [f"{doc.relative_to(REPO)}: {target}" for doc in DOCS for target in LINK.findall(doc.read_text())
              if "://" not in target and not (doc.parent / target).exists()]
    assert not broken, "\n".join(broken)
