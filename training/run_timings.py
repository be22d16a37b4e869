"""Wall time of a resumable training command's phases, kept in its run directory, and the machine it ran on.

A resumed command skips the phases whose outputs exist; their times stay those of the invocation that did the
work, so the model card's figures are the work's, not the last invocation's (which may be a few seconds).
"""

from __future__ import annotations

import json
import os
import platform
import re
import time
from collections.abc import ItemsView, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


class PhaseTimes:
    """Seconds per named phase, accumulated across invocations in a JSON file (written after every phase)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._seconds: dict[str, float] = json.loads(path.read_text()) if path.is_file() else {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time the block and add it to `name` (a phase interrupted part-way adds nothing)."""
        start = time.perf_counter()
        yield
        self._seconds[name] = self._seconds.get(name, 0.0) + time.perf_counter() - start
        self._save()

    def record(self, name: str, seconds: float) -> None:
        """Set `name` to `seconds` measured elsewhere (e.g. a training loop that keeps its own time)."""
        self._seconds[name] = float(seconds)
        self._save()

    def _save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self._seconds, indent=1))
        tmp.replace(self.path)

    def items(self) -> ItemsView[str, float]:
        return self._seconds.items()

    def total(self) -> float:
        return float(sum(self._seconds.values()))


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo; else the platform's processor, else "unknown")."""
    try:
        found = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(errors="replace"), re.M)
    except OSError:
        found = None
    return found.group(1).strip() if found else platform.processor() or "unknown"


def machine() -> dict[str, Any]:
    """CPU model, cores, torch threads and GPU of this machine (what the phase times depend on)."""
    import torch

    return {"cpu": cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
