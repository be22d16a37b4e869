"""Memory per stage: peak RSS of one job (load .. validate) against the study's voxel bytes.

Each series length runs in a fresh Python process (so no allocator high-water mark carries over) that
loads the model's warm backend first, then runs the worker's stages in order on a synthetic chest CT:
load, preprocess, infer, postprocess, then SR / SEG / GSPS encoding and validation. A sampling thread
(2 ms) records the peak RSS of every stage; the job's cost is the peak above the warm baseline, divided by
the study's stored voxel bytes (rows x columns x 2 bytes per slice).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks import common
from harness.ct import write_chest_study

NAME = "memory"
STAGES = ("load", "preprocess", "infer", "postprocess", "headers", "encode_seg", "encode_sr", "encode_gsps",
          "validate")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--slices", type=int, nargs="+", default=None, help="series lengths (default 100 300 600)")
    p.add_argument("--rows", type=int, default=None, help="rows = columns (default 512; tiny 64)")
    p.add_argument("--probability", type=float, default=None,
                   help="override the model's probability threshold (e.g. to force findings into SR/SEG)")


def _rss_mib() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def profile_job(models_dir: Path, model_name: str, series_dir: Path, probability: float | None) -> dict[str, Any]:
    """Run one job's stages in this process; peak RSS (MiB) and seconds per stage."""
    import gc

    import pydicom

    from inference.backends.factory import make_backend
    from inference.encode import encode_gsps, encode_seg, encode_sr
    from inference.findings import InferenceResult
    from inference.model_pass import model_logits
    from inference.model_repo import discover_models
    from inference.postprocess import postprocess
    from inference.preprocess import preprocess
    from inference.validation import validate_output
    from inference.volume import load_series

    model = discover_models(models_dir)[model_name]
    card = model.card
    if probability is not None:
        card = card.model_copy(update={"thresholds": card.thresholds.model_copy(update={"probability": probability})})
    backend = make_backend(model, "onnxruntime")
    paths = sorted(series_dir.glob("*.dcm"))
    peak = [0.0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_mib())
            time.sleep(0.002)

    gc.collect()
    baseline = _rss_mib()
    peak[0] = baseline
    threading.Thread(target=sample, daemon=True).start()
    stages: dict[str, dict[str, float]] = {}
    state: dict[str, Any] = {}

    def stage(name: str, fn: Any) -> None:
        t0 = time.perf_counter()
        fn()
        time.sleep(0.01)
        stages[name] = {"seconds": time.perf_counter() - t0, "peak_mib": peak[0], "after_mib": _rss_mib()}
        peak[0] = _rss_mib()

    def infer() -> None:
        image = state.pop("image")
        state["logits"] = model_logits(image, backend, card)

    def post() -> None:
        findings, label_map = postprocess(state.pop("logits"), state["volume"], card, state["info"])
        vol = state.pop("volume")
        state["result"] = InferenceResult(
            findings=findings, label_map=label_map, source_sop_instance_uids=list(vol.sop_instance_uids),
            model_name=card.name, model_version=card.version, weights_sha256=card.weights_sha256, stage_seconds={})

    stage("load", lambda: state.update(volume=load_series(paths, expected_modality=card.modality)))
    stage("preprocess", lambda: state.update(zip(("image", "info"), preprocess(state["volume"], card), strict=True)))
    stage("infer", infer)
    stage("postprocess", post)
    stage("headers", lambda: state.update(sources=[pydicom.dcmread(p, stop_before_pixels=True) for p in paths]))
    stage("encode_seg", lambda: state.update(seg=encode_seg(state["result"], card, state["sources"])))
    stage("encode_sr", lambda: state.update(sr=encode_sr(state["result"], card, state["sources"], seg=state["seg"],
                                                         supersedes=[])))
    stage("encode_gsps", lambda: state.update(gsps=encode_gsps(state["result"], card, state["sources"])))
    stage("validate", lambda: [validate_output(state[k]) for k in ("sr", "seg", "gsps") if state[k] is not None])
    stop.set()
    return {"baseline_mib": baseline, "stages": stages, "findings": len(state["result"].findings)}


def _child(args: list[str]) -> None:
    models_dir, name, series, prob = Path(args[0]), args[1], Path(args[2]), args[3]
    out = profile_job(models_dir, name, series, None if prob == "-" else float(prob))
    print("RESULT " + json.dumps(out))


def run(args: argparse.Namespace, out: Path, info: dict[str, Any]) -> dict[str, Any]:
    slices = args.slices or ([16] if args.tiny else [100, 300, 600])
    rows = args.rows or (64 if args.tiny else 512)
    settings = {"slices": slices, "rows": rows, "model": "lung_nodule_ct", "onnxruntime_threads": "default",
                "probability_override": args.probability, "sampling_ms": 2}
    data = common.payload(NAME, info, settings)
    with tempfile.TemporaryDirectory(prefix="dxgate-mem-") as tmp:
        work = Path(tmp)
        models_dir, source = common.lung_models(work)
        settings["models"] = source
        for n in common.progress(slices, "memory"):
            series = work / f"s{n}"
            write_chest_study(series, n, rows, seed=n)
            proc = subprocess.run(
                [sys.executable, "-m", "benchmarks.memory_bench", "--child", str(models_dir), "lung_nodule_ct",
                 str(series), "-" if args.probability is None else str(args.probability)],
                capture_output=True, text=True, cwd=common.REPO, timeout=1800)
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if proc.returncode != 0 or line is None:
                raise RuntimeError(f"memory profile of {n} slices failed: {proc.stderr[-800:]}")
            res = json.loads(line[len("RESULT "):])
            voxel_mib = n * rows * rows * 2 / 2**20
            peak = max(s["peak_mib"] for s in res["stages"].values())
            job_peak = peak - res["baseline_mib"]
            data["results"].append({
                "slices": n, "voxel_mib": voxel_mib, "baseline_mib": res["baseline_mib"], "peak_mib": peak,
                "job_peak_mib": job_peak, "job_peak_x_voxels": job_peak / voxel_mib,
                "peak_stage": max(res["stages"], key=lambda k: res["stages"][k]["peak_mib"]),
                "findings": res["findings"], "stages": res["stages"]})
    rows_md = [{"slices": r["slices"], "voxel MiB": r["voxel_mib"], "baseline MiB": r["baseline_mib"],
                "job peak MiB (above baseline)": r["job_peak_mib"], "x voxel bytes": r["job_peak_x_voxels"],
                "peak stage": r["peak_stage"], "findings": r["findings"]} for r in data["results"]]
    stage_md = [{"slices": r["slices"], **{s: r["stages"][s]["peak_mib"] - r["baseline_mib"] for s in STAGES}}
                for r in data["results"]]
    data["summary"] = {str(r["slices"]): round(r["job_peak_x_voxels"], 2) for r in data["results"]}
    common.write_json(out / f"{NAME}.json", data)
    common.write_markdown(out / f"{NAME}.md", "Memory per job stage", data, [
        ("Peak RSS of one job", common.md_table(rows_md, list(rows_md[0]))),
        ("Peak RSS above baseline per stage (MiB)", common.md_table(stage_md, ["slices", *STAGES])),
        ("Command", f"`python -m benchmarks memory{' --tiny' if args.tiny else ''}`"),
    ])
    last = data["results"][-1]
    common.bar_plot(out / f"{NAME}_stages.png", list(STAGES),
                    [last["stages"][s]["peak_mib"] - last["baseline_mib"] for s in STAGES],
                    "peak RSS above baseline (MiB)", f"{last['slices']} slices x {rows}^2: per-stage peak")
    return data


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "--child":
    _child(sys.argv[2:])
