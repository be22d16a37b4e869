"""Shared benchmark plumbing: machine info, results folder, JSON/Markdown/PNG writers, progress, dcmtk.

Benchmarks are not tests: they print, save figures and record every setting that shaped a number.
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
        out = subprocess.run([dcmtk("storescu"), "--version"], capture_output=True, text=True, timeout=10).stdout
    except (FileNotFoundError, subprocess.SubprocessError, OSError):
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


# -- dcmtk and processes -------------------------------------------------------------------------
def dcmtk(tool: str) -> str:
    """Path of a dcmtk tool; skips look-alikes such as pynetdicom's Python `storescu` in a venv."""
    candidates = [Path(os.environ["DCMTK_BIN"]) / tool] if os.environ.get("DCMTK_BIN") else []
    candidates += [Path(d) / tool for d in os.environ.get("PATH", "").split(os.pathsep) if d]
    candidates += [Path("/usr/bin") / tool, Path("/usr/local/bin") / tool]
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            with open(path, "rb") as f:
                if f.read(2) != b"#!":  # a real binary, not a script
                    return str(path)
    raise FileNotFoundError(f"dcmtk's {tool} is not installed (apt-get install dcmtk)")


def dcmtk_env() -> dict[str, str]:
    """dcmtk reads TCP_NODELAY from the environment (dcmtk/dcmnet/docs/envvars.txt)."""
    return {**os.environ, "TCP_NODELAY": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_echo(port: int, aec: str, timeout_s: float = 60.0, proc: subprocess.Popen | None = None) -> None:
    """Wait until a C-ECHO to 127.0.0.1:port succeeds (PS3.7 9.1.5 verification)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server exited with status {proc.returncode} before answering C-ECHO")
        r = subprocess.run([dcmtk("echoscu"), "-aec", aec, "-to", "2", "127.0.0.1", str(port)],
                           capture_output=True, env=dcmtk_env())
        if r.returncode == 0:
            return
        time.sleep(0.3)
    raise TimeoutError(f"no C-ECHO answer on port {port} within {timeout_s:.0f} s")


def stop(proc: subprocess.Popen, timeout_s: float = 15.0) -> None:
    """SIGTERM, then SIGKILL: only the process this benchmark started."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def peak_rss_mb(pid: int) -> float | None:
    """VmHWM (peak resident set) of a live process, in MiB."""
    match = re.search(r"^VmHWM:\s*(\d+) kB", _read(f"/proc/{pid}/status"), re.M)
    return round(int(match.group(1)) / 1024, 1) if match else None


def dir_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


# -- synthetic studies ---------------------------------------------------------------------------
# Every benchmark study has the same voxel size (1 mm slices, 0.7 mm pixels at 512 rows), so cost is compared
# per slice: with the generator's seeded spacing (0.625-2.5 mm slices) the model grid, and so the inference
# cost, of two studies with the same slice count differed by up to 4x.
STUDY_SLICE_MM = 1.0
STUDY_FOV_MM = 358.4


def write_study(out_dir: Path, slices: int, rows: int, seed: int) -> list[Path]:
    """A synthetic axial chest CT series (not patient data) as one file per slice; returns the files.

    Uses training.synthetic.write_chest_ct_study (realistic anatomy) when it is available, else a
    noise phantom written with pydicom (enough for transfer and latency numbers).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        from training.synthetic import write_chest_ct_study
    except ImportError:
        return _noise_study(out_dir, slices, rows, seed)
    px = STUDY_FOV_MM / rows
    study = write_chest_ct_study(out_dir, seed=seed, slices=slices, rows=rows, spacing=(STUDY_SLICE_MM, px, px))
    return sorted(Path(f) for f in study.files)


def _noise_study(out_dir: Path, slices: int, rows: int, seed: int) -> list[Path]:
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    rng = np.random.default_rng(seed)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    files = []
    for k in range(slices):
        ds = _ct_slice(rng, rows, k, study, series, frame)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, ds.SOPInstanceUID
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta = meta
        path = out_dir / f"CT{k:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return files


def _ct_slice(rng: np.random.Generator, rows: int, k: int, study: str, series: str, frame: str) -> Any:
    """One CT Image IOD slice (PS3.3 A.3) with synthetic identifiers."""
    from pydicom.dataset import Dataset
    from pydicom.uid import CTImageStorage, generate_uid

    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "SYNTHETIC^BENCH", "BENCH0001", "", "O"
    ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.StudyID = "20240101", "120000", "BENCH1", "1"
    ds.ReferringPhysicianName, ds.Manufacturer = "", "dxgate-benchmark"
    ds.Modality, ds.BodyPartExamined, ds.SeriesNumber, ds.InstanceNumber = "CT", "CHEST", 1, k + 1
    ds.SeriesDescription, ds.ImageType = "SYNTHETIC CHEST", ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.ImagePositionPatient = [-175.0, -175.0, -float(k) * 1.25]
    ds.PixelSpacing, ds.SliceThickness = [350.0 / rows, 350.0 / rows], 1.25
    ds.Rows = ds.Columns = rows
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleIntercept, ds.RescaleSlope, ds.KVP = -1024, 1, 120
    ds.PixelData = rng.integers(0, 1400, (rows, rows), dtype=np.int16).tobytes()
    return ds


# -- dxgate serve --------------------------------------------------------------------------------
def start_dxgate(workdir: Path, models_dir: Path, **config: Any) -> tuple[subprocess.Popen, dict[str, Any]]:
    """Start `dxgate serve --config FILE` on free loopback ports; wait for C-ECHO and /healthz.

    Returns (process, config). Raises RuntimeError (with the log tail) when it cannot start.
    """
    import urllib.request

    import yaml

    cfg: dict[str, Any] = {
        "ae_title": "DXGATE", "bind_address": "127.0.0.1", "dicom_port": free_port(), "http_port": free_port(),
        "data_dir": str(workdir / "var"), "models_dir": str(models_dir), "quiet_seconds": 1.0,
        "min_free_disk_mb": 1, "fsync": True, "destinations": [], "rules": [], "log_format": "json", **config,
    }
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "dxgate.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    log_path = workdir / "dxgate.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", "dxgate", "serve", "--config", str(path)],
                                cwd=REPO, stdout=log_file, stderr=subprocess.STDOUT)
    try:
        wait_for_echo(cfg["dicom_port"], cfg["ae_title"], timeout_s=90, proc=proc)
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{cfg['http_port']}/healthz", timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.2)
    except Exception as exc:
        stop(proc)
        tail = log_path.read_text(errors="replace")[-2000:]
        raise RuntimeError(f"dxgate serve did not start: {exc}\n{tail}") from exc
    return proc, cfg


def api_get(http_port: int, path: str) -> Any:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}{path}", timeout=10) as r:
        return json.loads(r.read())
