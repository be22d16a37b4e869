"""The import rule of docs/design.md, read from the source tree.

`dicom_gateway -> inference <- training`; `harness` (the test harness) above those three; `dxgate/` (the
command line) and `benchmarks/` on top. Every import counts, also one inside a function or under
TYPE_CHECKING: a function-local import does not make a cycle go away.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# package -> the first-party packages it may import (besides itself)
ALLOWED: dict[str, frozenset[str]] = {
    "inference": frozenset(),
    "dicom_gateway": frozenset({"inference"}),
    "training": frozenset({"inference"}),
    "harness": frozenset({"dicom_gateway", "inference", "training"}),
    "benchmarks": frozenset({"dicom_gateway", "inference", "training", "harness"}),
    "dxgate": frozenset({"dicom_gateway", "inference", "training", "benchmarks"}),
}
PACKAGES = tuple(p for p in ALLOWED if (REPO / p / "__init__.py").is_file())


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def source_modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((REPO / pkg).rglob("*.py"))}


def imported_names(path: Path, module: str) -> list[tuple[int, str, list[str]]]:
    """(line, module imported, names taken from it) for every import statement in the file."""
    is_package = path.name == "__init__.py"
    found: list[tuple[int, str, list[str]]] = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
                base = ".".join([*anchor, *([base] if base else [])])
            found.append((node.lineno, base, [a.name for a in node.names]))
    return found


def edges(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the first-party modules it imports (a `from package import module` names the module)."""
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        for _, target, names in imported_names(path, module):
            if target.split(".")[0] not in ALLOWED:
                continue
            subs = [f"{target}.{n}" for n in names if f"{target}.{n}" in modules]
            for t in subs or [target]:
                if t in modules and t != module:
                    graph[module].add(t)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as a list of modules, or None (iterative depth-first search)."""
    colour: dict[str, int] = dict.fromkeys(graph, 0)  # 0 new, 1 on the stack, 2 done
    for root in sorted(graph):
        if colour[root]:
            continue
        stack: list[tuple[str, list[str]]] = [(root, sorted(graph[root]))]
        colour[root] = 1
        while stack:
            node, todo = stack[-1]
            if not todo:
                colour[node] = 2
                stack.pop()
                continue
            nxt = todo.pop()
            if colour[nxt] == 1:
                path = [n for n, _ in stack]
                return [*path[path.index(nxt):], nxt]
            if colour[nxt] == 0:
                colour[nxt] = 1
                stack.append((nxt, sorted(graph[nxt])))
    return None


def test_imports_go_one_way() -> None:
    wrong = []
    for module, path in source_modules().items():
        package = module.split(".")[0]
        for line, target, _ in imported_names(path, module):
            other = target.split(".")[0]
            if other in ALLOWED and other != package and other not in ALLOWED[package]:
                wrong.append(f"{path.relative_to(REPO)}:{line} imports {target}")
    assert not wrong, "imports against the rule of docs/design.md:\n" + "\n".join(wrong)


def test_no_import_cycles() -> None:
    cycle = find_cycle(edges(source_modules()))
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_no_private_names_imported_across_modules() -> None:
    wrong = []
    for module, path in source_modules().items():
        for line, target, names in imported_names(path, module):
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if target.split(".")[0] in ALLOWED and private:
                wrong.append(f"{path.relative_to(REPO)}:{line} takes {', '.join(private)} from {target}")
    assert not wrong, "\n".join(wrong)


def test_the_checker_sees_a_cycle_and_a_wrong_import(tmp_path: Path) -> None:
    graph = {"a.x": {"a.y"}, "a.y": {"a.z"}, "a.z": {"a.x"}, "a.w": set()}
    assert find_cycle(graph) == ["a.x", "a.y", "a.z", "a.x"]
    assert find_cycle({"a.x": {"a.y"}, "a.y": set()}) is None
    src = tmp_path / "m.py"
    src.write_text("def f():\n    from training.train import _step, run\n")
    assert imported_names(src, "inference.m") == [(2, "training.train", ["_step", "run"])]


@pytest.mark.parametrize("package", ["dicom_gateway", "inference"])
def test_the_gateway_loads_no_training_stack(package: str) -> None:
    """Importing every module of the gateway (or of inference) loads neither torch, monai, training nor benchmarks."""
    modules = [m for m in source_modules() if m.split(".")[0] == package]
    code = ("import importlib, sys\n"
            f"for m in {modules!r}: importlib.import_module(m)\n"
            "print(','.join(sorted(m for m in ('torch', 'monai', 'training', 'benchmarks', 'dxgate', 'harness')"
            " if m in sys.modules)))")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "", f"import {package} loaded {res.stdout.strip()}"
