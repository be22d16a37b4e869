"""Figures for evaluation reports: FROC curve and localisation-error distribution (matplotlib, Agg)."""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Protocol

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (backend must be chosen first)
import numpy as np  # noqa: E402


class Froc(Protocol):
    """What a FROC plot reads: `training.metrics.froc.FrocResult`, `training.scoring.served.ServedCurve`."""

    operating_points: tuple[float, ...]
    n_nodules: int
    n_scans: int

    @property
    def sensitivities(self) -> tuple[float, ...]: ...

    @property
    def cpm(self) -> float: ...

    def sensitivity_at(self, fp_per_scan: float) -> float: ...


def plot_froc(result: Froc, out: Path, title: str = "FROC") -> Path:
    """FROC curve on a log2 FP-per-scan axis (1/8 .. 8, as LUNA16 plots it), CPM in the legend."""
    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=120)
    grid = np.geomspace(min(result.operating_points), max(result.operating_points), 400)
    ax.plot(grid, [result.sensitivity_at(x) for x in grid], lw=2, label=f"CPM = {result.cpm:.3f}")
    ax.plot(result.operating_points, result.sensitivities, "o", color="C1", label="operating points")
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(result.operating_points))
    ax.set_xticklabels([f"{x:g}" for x in result.operating_points])
    ax.set_xlim(min(result.operating_points), max(result.operating_points))
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("Average number of false positives per scan")
    ax.set_ylabel("Sensitivity")
    ax.set_title(textwrap.fill(f"{title} ({result.n_nodules} nodules, {result.n_scans} scans)", 60), fontsize=10)
    ax.grid(True, which="both", alpha=0.4)
    ax.legend(loc="lower right")
    return _save(fig, out)


def plot_errors(errors: Sequence[float] | Mapping[str, Sequence[float]], out: Path,
                title: str = "Localisation error", threshold_mm: float | None = None) -> Path:
    """Histogram of all errors (left) and a box plot per label (right, when labels are given)."""
    groups = dict(errors) if isinstance(errors, Mapping) else {"all": list(errors)}
    values = np.asarray([e for v in groups.values() for e in v], dtype=float)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), dpi=120, gridspec_kw={"width_ratios": [1, 2]})
    axes[0].hist(values, bins=min(30, max(5, len(values))), color="C0")
    axes[0].set_xlabel("error (mm)")
    axes[0].set_ylabel("count")
    labels = [k for k, v in groups.items() if len(v)]
    if labels:
        axes[1].boxplot([list(groups[k]) for k in labels])
        axes[1].set_xticks(range(1, len(labels) + 1), labels, rotation=90 if len(labels) > 8 else 0)
    axes[1].set_ylabel("error (mm)")
    if threshold_mm is not None:
        axes[0].axvline(threshold_mm, color="C3", ls="--", label=f"{threshold_mm:g} mm")
        axes[1].axhline(threshold_mm, color="C3", ls="--")
        axes[0].legend()
    median = float(np.median(values)) if values.size else float("nan")
    fig.suptitle(f"{title} (n = {values.size}, median {median:.1f} mm)")
    return _save(fig, out)


def _save(fig: plt.Figure, out: Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out
