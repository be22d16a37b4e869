"""The shell blocks of the repository's Markdown, and a place to run them as a newcomer would."""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = REPO / ".venv" / "bin"
_BLOCK = re.compile(r"^```sh\n(.*?)^```", re.MULTILINE | re.DOTALL)
_OPERATOR = re.compile(r"^(\d?>|<|\||&|;|&&|\|\|)")  # where a shell command's own arguments end


def sh_blocks(path: Path) -> list[tuple[str, str]]:
    """(heading the block stands under, block text) for every ```sh block of a Markdown file."""
    text = path.read_text(encoding="utf-8")
    out = []
    for m in _BLOCK.finditer(text):
        headings = re.findall(r"^#+ (.+)$", text[: m.start()], re.MULTILINE)
        out.append((headings[-1] if headings else "", m.group(1)))
    return out


def block_under(path: Path, heading: str) -> str:
    """The one ```sh block under `## heading`."""
    blocks = [b for h, b in sh_blocks(path) if h == heading]
    assert len(blocks) == 1, f"{path.name}: {len(blocks)} sh blocks under {heading!r}"
    return blocks[0]


def commands(block: str) -> list[list[str]]:
    """The commands of a block as argument lists: continuations joined, comments, redirections and `&` dropped."""
    out = []
    for line in block.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        cut = next((i for i, w in enumerate(words) if _OPERATOR.match(w)), len(words))
        if words[:cut]:
            out.append(words[:cut])
    return out


def newcomer_dir(tmp: Path) -> Path:
    """A working folder that looks like the repository root to the docs' commands: `.venv` and `models`."""
    for name in (".venv", "models"):
        (tmp / name).symlink_to(REPO / name, target_is_directory=True)
    return tmp


def venv_env(**extra: str) -> dict[str, str]:
    """The environment after `. .venv/bin/activate`: the venv's bin first on PATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DXGATE_")}
    env.update(PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}", VIRTUAL_ENV=str(REPO / ".venv"), **extra)
    return env
