"""End-to-end latency: study sent by storescu -> results stored at a dcmtk storescp destination.

Per study: from the exit of its `storescu` (the last C-STORE response and the association release)
to the last result file (SR / SEG / GSPS) stored at the destination, plus the per-stage breakdown
from the gateway's job API (`stage_seconds`), p50/p95/p99, for 1 and 4 concurrent senders and
several series lengths, and the peak RSS (VmHWM) of the `dxgate serve` process.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from benchmarks import common
from harness.ct import write_chest_study
from harness.dcmtk import run_storescu, start_storescp
from harness.gateway import RunningGateway, start_gateway, write_config
from harness.triton_server import serve_onnx_model

NAME = "e2e"
STAGES = ("receive", "quiet_wait", "load", "preprocess", "infer", "postprocess", "encode", "validate", "send")
FINAL = {"DONE", "FAILED"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--studies", type=int, default=None, help="studies per configuration (default 20; tiny 2)")
    p.add_argument("--slices", type=int, nargs="+", default=None, help="series lengths (default 100 300 600)")
    p.add_argument("--senders", type=int, nargs="+", default=None, help="concurrent senders (default 1 4)")
    p.add_argument("--rows", type=int, default=None, help="rows = columns (default 512; tiny 128)")
    p.add_argument("--quiet-seconds", type=float, default=None, help="dxgate quiet_seconds (default 2; tiny 1)")
    p.add_argument("--fsync", choices=["on", "off"], default="on", help="dxgate fsync setting (default on)")
    p.add_argument("--workers", type=int, default=1, help="dxgate worker.count")
    p.add_argument("--timeout", type=float, default=None, help="seconds to wait for one configuration")
    p.add_argument("--backend", nargs="+", choices=["onnxruntime", "triton"], default=["onnxruntime"],
                   help="model backends to compare, each with its own gateway in the same run (triton: a real "
                        "server from nvidia-pytriton serving the same ONNX over gRPC + system shared memory)")


def _send(files: list[Path], port: int) -> float:
    proc = run_storescu(files, port, "DXGATE", calling_ae="BENCHSCU", timeout_s=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"storescu failed: {proc.stderr[-500:]}")
    return time.time()


def _delivered(od: Path) -> dict[str, float]:
    """StudyInstanceUID -> mtime of the last file stored at the destination."""
    import pydicom

    last: dict[str, float] = {}
    for path in od.rglob("*"):
        if not path.is_file():
            continue
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["StudyInstanceUID"])
            uid = str(ds.StudyInstanceUID)
        except Exception:  # a file storescp is still writing
            continue
        last[uid] = max(last.get(uid, 0.0), path.stat().st_mtime)
    return last


def _wait_jobs(gw: RunningGateway, studies: set[str], deadline: float) -> list[dict[str, Any]]:
    while True:
        jobs = [j for j in gw.api("/jobs?limit=1000") if j.get("study_uid") in studies]
        done = {j["study_uid"] for j in jobs if j.get("state") in FINAL}
        if done >= studies and all(j.get("state") in FINAL for j in jobs):
            return jobs
        if gw.proc.poll() is not None:
            raise RuntimeError(f"dxgate exited with status {gw.proc.returncode}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(studies - done)} of {len(studies)} studies not finished")
        time.sleep(0.5)


def _one_config(studies: list[tuple[str, list[Path]]], senders: int, gw: RunningGateway, od: Path,
                timeout: float) -> list[dict[str, Any]]:
    sent: dict[str, float] = {}
    with cf.ThreadPoolExecutor(max_workers=senders) as pool:
        futures = {pool.submit(_send, files, gw.dicom_port): uid for uid, files in studies}
        for fut in common.progress(cf.as_completed(futures), f"send x{senders}", total=len(futures)):
            sent[futures[fut]] = fut.result()
    jobs = _wait_jobs(gw, set(sent), time.monotonic() + timeout)
    time.sleep(0.5)  # let storescp finish its last file
    delivered = _delivered(od)
    rows = []
    for job in jobs:
        detail = gw.api(f"/jobs/{job['id']}")
        stage = detail.get("stage_seconds") or {}
        uid = job["study_uid"]
        rows.append({
            "study_uid": uid, "job_id": job["id"], "state": job.get("state"), "failed_stage": job.get("failed_stage"),
            "latency_s": (delivered[uid] - sent[uid]) if uid in delivered else None,
            "stage_seconds": {k: stage.get(k) for k in STAGES} | {k: v for k, v in stage.items() if k not in STAGES},
            "findings": job.get("findings")})
    return rows


def run(args: argparse.Namespace, out: Path, info: dict[str, Any]) -> dict[str, Any]:
    n = args.studies or (2 if args.tiny else 20)
    slice_list = args.slices or ([20] if args.tiny else [100, 300, 600])
    senders_list = args.senders or ([1] if args.tiny else [1, 4])
    rows = args.rows or (128 if args.tiny else 512)
    quiet = args.quiet_seconds if args.quiet_seconds is not None else (1.0 if args.tiny else 2.0)
    timeout = args.timeout or (300.0 if args.tiny else 3600.0)
    result = common.payload(NAME, info, {
        "studies": n, "slices": slice_list, "senders": senders_list, "rows": rows, "quiet_seconds": quiet,
        "fsync": args.fsync == "on", "workers": args.workers, "TCP_NODELAY_dcmtk": 1, "max_pdu_storescu": 16384,
        "destination": "dcmtk storescp --fork", "latency": "storescu exit -> mtime of last result file"})
    with tempfile.TemporaryDirectory(prefix="dxgate-e2e-") as tmp_name:
        tmp = Path(tmp_name)
        models_dir, result["settings"]["model"] = common.lung_models(tmp)
        od = tmp / "destination"
        dest = start_storescp(od, "STORESCP", extra=["--fork"])
        try:
            for backend in args.backend:
                with ExitStack() as stack:
                    _run_backend(backend, stack, args, result, tmp, models_dir, od, dest.port, quiet, n,
                                 slice_list, senders_list, rows, timeout)
        finally:
            dest.stop()
    result["summary"] = _summary(result)
    _write(result, out)
    return result


def _backend_settings(backend: str, stack: ExitStack, models_dir: Path, tmp: Path) -> dict[str, Any]:
    """dxgate `backends:` for the lung model; starts a Triton server for 'triton' (closed with `stack`)."""
    if backend == "onnxruntime":
        return {}
    onnx = next((models_dir / "lung_nodule_ct").glob("*/model.onnx"))
    ep = stack.enter_context(serve_onnx_model(onnx, "lung_nodule_ct", log_path=tmp / "tritonserver.log"))
    return {"lung_nodule_ct": {"kind": "triton", "url": ep.grpc_url, "protocol": "grpc", "shared_memory": True}}


def _run_backend(backend: str, stack: ExitStack, args: argparse.Namespace, result: dict[str, Any], tmp: Path,
                 models_dir: Path, od: Path, dest_port: int, quiet: float, n: int, slice_list: list[int],
                 senders_list: list[int], rows: int, timeout: float) -> None:
    """All configurations through one gateway whose lung model runs on `backend`."""
    try:
        backends = _backend_settings(backend, stack, models_dir, tmp)
        gw = start_gateway(write_config(
            tmp / f"dxgate-{backend}", models_dir, fsync=args.fsync == "on", quiet_seconds=quiet,
            worker={"count": args.workers}, backends=backends,
            destinations=[{"name": "dest", "ae_title": "STORESCP", "host": "127.0.0.1", "port": dest_port}],
            rules=[{"name": "chest", "match": {"modality": ["CT"], "body_part": ["CHEST"]},
                    "models": ["lung_nodule_ct"], "destinations": ["dest"]}]), timeout=120)
    except Exception as exc:  # no gateway (or no Triton server) for this backend: say why, go on
        result.setdefault("unavailable", {})[backend] = str(exc)[-1000:]
        common.log(f"{backend}: dxgate could not start: {str(exc).splitlines()[0]}")
        return
    try:
        seed = 1000   # the same studies for every backend
        for slices in slice_list:
            for senders in senders_list:
                studies = []
                for _ in common.progress(range(n), f"write {slices}-slice studies"):
                    seed += 1
                    folder = tmp / "studies" / str(seed)
                    files = sorted(folder.glob("*.dcm")) or write_chest_study(folder, slices, rows, seed)
                    studies.append((_study_uid(files[0]), files))
                # a study already sent to the previous backend's gateway is new to this one
                try:
                    rows_ = _one_config(studies, senders, gw, od, timeout)
                except (TimeoutError, RuntimeError, OSError) as exc:
                    result.setdefault("errors", []).append(_diagnose(exc, studies, gw))
                    common.log(f"{backend} {slices} slices x{senders}: {exc}")
                    continue
                for r in rows_:
                    r.update(slices=slices, senders=senders, backend=backend)
                result["results"] += rows_
                key = f"{slices}x{senders}" if backend == "onnxruntime" else f"{backend} {slices}x{senders}"
                result.setdefault("peak_rss_mb", {})[key] = common.peak_rss_mb(gw.pid)
                common.log(f"{backend} {slices} slices x{senders}: "
                           f"{common.stats([r['latency_s'] for r in rows_ if r['latency_s']])['p50']} s p50")
    finally:
        gw.stop()


def _diagnose(exc: Exception, studies: list[tuple[str, list[Path]]], gw: RunningGateway) -> dict:
    """What the gateway says about the studies that did not finish, and its log tail."""
    states = {}
    for uid, _ in studies:
        try:
            study = gw.api(f"/studies/{uid}")
            states[uid] = {"state": study.get("state"), "reason": study.get("reason"),
                           "jobs": [(j.get("state"), j.get("failed_stage"), j.get("reason"))
                                    for j in study.get("jobs", [])]}
        except OSError as err:
            states[uid] = {"error": str(err)}
    return {"error": f"{type(exc).__name__}: {exc}", "studies": states, "dxgate_log_tail": gw.log()[-3000:]}


def _study_uid(path: Path) -> str:
    import pydicom

    return str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)


def _summary(result: dict[str, Any]) -> dict[str, Any]:
    unavailable = result.get("unavailable", {})
    groups: dict[str, Any] = {"dxgate_available": bool(result["results"]) or not unavailable}
    if unavailable:
        groups["error"] = "; ".join(f"{k}: {v}" for k, v in unavailable.items())
    keys = sorted({(r.get("backend", "onnxruntime"), r["slices"], r["senders"]) for r in result["results"]},
                  key=lambda k: (k[0] != "onnxruntime", k))
    for backend, slices, senders in keys:
        rs = [r for r in result["results"] if (r.get("backend", "onnxruntime"), r["slices"], r["senders"])
              == (backend, slices, senders)]
        lat = [r["latency_s"] for r in rs if r["latency_s"] is not None]
        stage_p50 = {s: common.stats([r["stage_seconds"][s] for r in rs
                                      if r["stage_seconds"].get(s) is not None])["p50"] for s in STAGES}
        rss_key = f"{slices}x{senders}" if backend == "onnxruntime" else f"{backend} {slices}x{senders}"
        name = f"{slices} slices x{senders} senders" + ("" if backend == "onnxruntime" else f" [{backend}]")
        groups[name] = {
            "backend": backend, "latency_s": common.stats(lat), "done": sum(r["state"] == "DONE" for r in rs),
            "studies": len(rs), "stage_p50_s": stage_p50, "peak_rss_mb": result.get("peak_rss_mb", {}).get(rss_key)}
        base = groups.get(f"{slices} slices x{senders} senders")
        if backend != "onnxruntime" and base and base["latency_s"]["p50"] and groups[name]["latency_s"]["p50"]:
            groups[name]["p50_vs_onnxruntime"] = groups[name]["latency_s"]["p50"] / base["latency_s"]["p50"]
    return groups


def _write(result: dict[str, Any], out: Path) -> None:
    common.write_json(out / f"{NAME}.json", result)
    groups = {k: v for k, v in result["summary"].items() if isinstance(v, dict) and "latency_s" in v}
    table = [{"configuration": k, "done/studies": f"{v['done']}/{v['studies']}", "p50 s": v["latency_s"]["p50"],
              "p95 s": v["latency_s"]["p95"], "p99 s": v["latency_s"]["p99"], "peak RSS MiB": v["peak_rss_mb"],
              "p50 vs in-process": v.get("p50_vs_onnxruntime")} for k, v in groups.items()]
    stages = [{"configuration": k, **{s: v["stage_p50_s"][s] for s in STAGES}} for k, v in groups.items()]
    sections = [("Latency: last C-STORE response -> last result stored",
                 common.md_table(table, ["configuration", "done/studies", "p50 s", "p95 s", "p99 s", "peak RSS MiB",
                                         "p50 vs in-process"])),
                ("Per-stage p50 seconds (job API stage_seconds)", common.md_table(stages, ["configuration", *STAGES]))]
    for err in result.get("errors", []):
        sections.append(("Error", f"{err['error']}\n\n```\n{json.dumps(err['studies'], indent=1)[:3000]}\n```"))
    if result["summary"].get("error"):
        sections.append(("Not run", f"dxgate serve could not start:\n\n```\n{result['summary'].get('error')}\n```"))
    common.write_markdown(out / f"{NAME}.md", "End-to-end latency", result, sections)
    labels = list(groups) or ["(no data)"]
    values = [v["latency_s"]["p50"] or 0.0 for v in groups.values()] or [0.0]
    common.bar_plot(out / f"{NAME}_latency.png", labels, values, "seconds (p50)", "Study in -> results at destination")
