"""The repository describes the software as it is: short modules, a short README, no lab notes.

No module over 400 lines; no session numbers and no absolute paths of anybody's machine in any
tracked `.py` or `.md` file, model card or YAML recipe; the README at most 120 lines; no reference to
a file that is not in the repository.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MAX_MODULE_LINES = 400
MAX_README_LINES = 120
SESSION = re.compile(r"\bsession\s+\d+|\bsessions\s+\d+\s*[-–]\s*\d+", re.IGNORECASE)
# Folders of somebody's machine; a path under /tmp written by a command the docs show (e.g. `--out
# /tmp/chest`) is an example, not a machine path, and the test files' own temp folders come from tmp_path.
MACHINE_PATH = re.compile(r"(?<![\w.])/(?:work|home|root|Users|mnt|opt/pypi\w*)/[\w.-]+|/tmp/s\d+\b")
MISSING_DOCS = ("shared/DESIGN.md", "CONTRACTS.md")


def tracked(*patterns: str) -> list[Path]:
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", *patterns], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout.split()
    return [REPO / p for p in out if (REPO / p).is_file()]


def test_no_module_over_400_lines() -> None:
    long = {str(p.relative_to(REPO)): n for p in tracked("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    assert not long, f"modules over {MAX_MODULE_LINES} lines: {long}"


def test_readme_is_short() -> None:
    n = len((REPO / "README.md").read_text().splitlines())
    assert n <= MAX_README_LINES, f"README.md has {n} lines"


def test_no_session_numbers_or_machine_paths() -> None:
    this = Path(__file__).resolve()
    found = []
    for path in tracked("*.py", "*.md", "*.yaml", "models/*/metadata.json"):
        if path.resolve() == this:
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if SESSION.search(line) or MACHINE_PATH.search(line):
                found.append(f"{path.relative_to(REPO)}:{i}: {line.strip()[:100]}")
    assert not found, "\n".join(found)


def test_no_reference_to_files_not_in_the_repository() -> None:
    this = Path(__file__).resolve()
    found = [f"{p.relative_to(REPO)} names {name}" for p in tracked("*.py", "*.md") if p.resolve() != this
             for name in MISSING_DOCS if name in p.read_text()]
    assert not found, "\n".join(found)


def test_the_patterns_catch_what_they_are_for() -> None:
    assert SESSION.search("retrained in session 27") and SESSION.search("Sessions 29-31")
    assert not SESSION.search("a DICOM association session")
    assert MACHINE_PATH.search("python /work/s30/pair_eval.py") and MACHINE_PATH.search("see /tmp/s31/x")
    assert not MACHINE_PATH.search("dxgate synth chest-ct --out /tmp/chest")
