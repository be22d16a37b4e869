"""A training run's log: one CSV row per step (always) and TensorBoard scalars (when installed).

A resumed run reopens the same CSV and drops the rows written after the checkpoint it resumes from, so the
log always matches the weights on disk.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any


class TrainingLog:
    """`step, loss, lr, <validation metric>, seconds` rows in `path`; TensorBoard events in `tb_dir`."""

    def __init__(self, path: Path, resume_step: int, val_name: str = "val_dice", tb_dir: Path | None = None) -> None:
        self.path, self.val_name = path, val_name
        if path.exists():  # drop rows written after the checkpoint we resume from
            with path.open(newline="", encoding="utf-8") as f:
                rows = [r for r in csv.reader(f) if r and (not r[0].isdigit() or int(r[0]) <= resume_step)]
            with path.open("w", newline="", encoding="utf-8") as f:
                csv.writer(f).writerows(rows)
        new = not path.exists() or path.stat().st_size == 0
        self.file = path.open("a", newline="", encoding="utf-8")
        self.csv = csv.writer(self.file)
        if new:
            self.csv.writerow(["step", "loss", "lr", val_name, "seconds"])
        self.tb: Any = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(tb_dir if tb_dir is not None else path.parent / "tb"))
        except ImportError:
            pass

    def row(self, step: int, loss: float, lr: float, val: float | None, seconds: float) -> None:
        self.csv.writerow([step, f"{loss:.5f}", f"{lr:.3g}", "" if val is None else f"{val:.4f}", f"{seconds:.3f}"])
        self.file.flush()
        if self.tb is not None:
            self.tb.add_scalar("loss", loss, step)
            self.tb.add_scalar("lr", lr, step)
            if val is not None:
                self.tb.add_scalar(self.val_name, val, step)

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()


def logged_seconds(path: Path, step: int) -> float:
    """Elapsed seconds the CSV log recorded at `step` (checkpoints written before "seconds" was saved)."""
    if not path.is_file():
        return 0.0
    with path.open(newline="", encoding="utf-8") as f:
        rows = [r for r in csv.reader(f) if r and r[0].isdigit() and int(r[0]) <= step]
    return float(rows[-1][4]) if rows else 0.0
