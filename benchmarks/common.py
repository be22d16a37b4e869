"""Shared benchmark plumbing: machine info, results folder, JSON/Markdown/PNG writers, progress.

Benchmarks are not tests: they print, save figures and record every setting that shaped a number. The
servers, peers and studies they measure come from the test harness (`harness`): dcmtk peers, the
gateway launcher, the Triton launcher and the synthetic CT writer.
"""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from harness.system import system_tool

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
T = TypeVar("T")


# -- machine -------------------------------------------------------------------------------------
def _read(path: str) -> str:
    try:
        return Path(path).read_text(errors="replace")
    except OSError:
        return ""


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def gpu_info() -> list[dict[str, str]]:
    """GPUs as reported by nvidia-smi; empty without one."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        out = subprocess.run([smi, "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=True).stdout
    except (subprocess.SubprocessError, OSError):
        return []
    rows = [[c.strip() for c in line.split(",")] for line in out.strip().splitlines() if line.strip()]
    return [{"name": r[0], "memory": r[1], "driver": r[2]} for r in rows if len(r) >= 3]


def dcmtk_version() -> str | None:
    try:
        out = subprocess.run([system_tool("storescu"), "--version"], capture_output=True, text=True,
                             timeout=10).stdout
    except (subprocess.SubprocessError, OSError):
        return None
    match = re.search(r"v(\d+\.\d+\.\d+)", out)
    return match.group(1) if match else None


def machine_info() -> dict[str, Any]:
    """CPU model, cores, RAM, GPUs and the versions of everything that shapes the numbers."""
    from training.run_timings import cpu_model

    mem = re.search(r"^MemTotal:\s*(\d+) kB", _read("/proc/meminfo"), re.M)
    return {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "cpu_model": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "ram_gib": round(int(mem.group(1)) / 2**20, 1) if mem else None,
        "gpus": gpu_info(),
        "versions": {
            "python": platform.python_version(),
            **{d: _version(d) for d in ("numpy", "onnxruntime", "onnxruntime-gpu", "torch", "pydicom",
                                          "pynetdicom", "tritonclient", "nvidia-pytriton", "monai", "dxgate")},
            "dcmtk": dcmtk_version(),
        },
    }


def machine_slug(info: dict[str, Any]) -> str:
    label = info["gpus"][0]["name"] if info["gpus"] else info["cpu_model"]
    slug = re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")[:40]
    return f"{slug}-{info['cpu_cores']}c"


def results_dir(out: Path | None, info: dict[str, Any]) -> Path:
    """`out` if given, else benchmarks/results/<machine>-<date>/."""
    path = out if out is not None else RESULTS / f"{machine_slug(info)}-{dt.date.today().isoformat()}"
    path.mkdir(parents=True, exist_ok=True)
    return path


# -- writers -------------------------------------------------------------------------------------
def write_json(path: Path, payload: dict[str, Any]) -> Path:
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n", encoding="utf-8")
    return path


def md_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_markdown(path: Path, title: str, payload: dict[str, Any], sections: Sequence[tuple[str, str]]) -> Path:
    m = payload["machine"]
    gpu = ", ".join(g["name"] for g in m["gpus"]) or "none"
    versions = ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v)
    settings = ", ".join(f"{k}={v}" for k, v in payload["settings"].items())
    parts = [f"# {title}", "", f"Run {payload['created']} on {m['cpu_model']} ({m['cpu_cores']} cores, "
             f"{m['ram_gib']} GiB RAM), GPU: {gpu}.", "", f"Versions: {versions}.", "", f"Settings: {settings}.", ""]
    for heading, body in sections:
        parts += [f"## {heading}", "", body, ""]
    path.write_text("\n".join(parts), encoding="utf-8")
    return path


def bar_plot(path: Path, labels: Sequence[str], values: Sequence[float], ylabel: str, title: str,
             errors: Sequence[float] | None = None) -> Path:
    """A labelled bar chart (matplotlib Agg, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(labels) + 2), 4))
    ax.bar(range(len(labels)), values, yerr=errors, capsize=3, color="#4477aa")
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def payload(name: str, info: dict[str, Any], settings: dict[str, Any]) -> dict[str, Any]:
    return {"benchmark": name, "created": dt.datetime.now().isoformat(timespec="seconds"),
            "machine": info, "settings": settings, "results": [], "summary": {}}


# -- numbers and progress ------------------------------------------------------------------------
def stats(values: Sequence[float]) -> dict[str, float | int | None]:
    """n, mean, min, max, p50, p95, p99 (None when empty)."""
    if not values:
        return {"n": 0, "mean": None, "min": None, "max": None, "p50": None, "p95": None, "p99": None}
    a = np.asarray(values, dtype=float)
    p50, p95, p99 = (float(v) for v in np.percentile(a, [50, 95, 99]))
    return {"n": int(a.size), "mean": float(a.mean()), "min": float(a.min()), "max": float(a.max()),
            "p50": p50, "p95": p95, "p99": p99}


def progress(items: Iterable[T], desc: str, total: int | None = None) -> Iterator[T]:
    """tqdm on stderr (plain iteration when tqdm is missing)."""
    try:
        from tqdm import tqdm
    except ImportError:
        yield from items
        return
    yield from tqdm(items, desc=desc, total=total, file=sys.stderr, leave=False, dynamic_ncols=True)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- models --------------------------------------------------------------------------------------
def lung_models(work: Path) -> tuple[Path, str]:
    """(models folder, its description): the shipped lung model, else one trained 5 steps into `work`."""
    shipped = REPO / "models"
    if any((shipped / "lung_nodule_ct").glob("*/model.onnx")):
        return shipped, "shipped models/lung_nodule_ct"
    from training.smoke_model import build_smoke_model  # torch: only when there is no shipped model

    build_smoke_model(work / "models", name="lung_nodule_ct", steps=5)
    return work / "models", "smoke model (training.smoke_model, 5 steps)"


# -- processes -----------------------------------------------------------------------------------
def peak_rss_mb(pid: int) -> float | None:
    """VmHWM (peak resident set) of a live process, in MiB."""
    match = re.search(r"^VmHWM:\s*(\d+) kB", _read(f"/proc/{pid}/status"), re.M)
    return round(int(match.group(1)) / 1024, 1) if match else None
