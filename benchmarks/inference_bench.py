"""Per-volume inference latency of one network across backends, with output parity.

The same weights run in PyTorch eager (CPU; CUDA fp32 / AMP when a GPU is present), ONNX Runtime
(CPU; CUDA with IO binding and TensorRT when the build offers them) and through a real Triton
server (gRPC and HTTP, with and without system shared memory). Each measurement is a whole
sliding-window pass over one volume (inference.sliding_window.sliding_window_infer).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import common
from harness.triton_server import TritonUnavailable, serve_onnx_model
from inference.backends.base import Backend

NAME = "inference"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shape", type=int, nargs=3, default=None, metavar=("Z", "Y", "X"),
                   help="volume on the model grid (default 96 192 192; tiny 24 48 48)")
    p.add_argument("--roi", type=int, nargs=3, default=None, metavar=("Z", "Y", "X"), help="sliding-window patch")
    p.add_argument("--overlap", type=float, default=0.25, help="sliding-window overlap between patches")
    p.add_argument("--batch", type=int, default=2, help="patches per backend call")
    p.add_argument("--repeats", type=int, default=None, help="timed passes per backend (default 3; tiny 2)")
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime / torch intra-op threads (0 = all)")
    p.add_argument("--model", default="auto",
                   help="'auto' (shipped models/lung_nodule_ct if present, else a fresh network), 'fresh', "
                        "or a path to a model.onnx")
    p.add_argument("--no-triton", action="store_true", help="skip the Triton server")


@contextmanager
def _network(args: argparse.Namespace, work: Path) -> Iterator[tuple[Path, Any, str]]:
    """(model.onnx, torch module or None, description). A fresh network gives torch and ONNX the same weights."""
    shipped = next((common.REPO / "models" / "lung_nodule_ct").glob("*/model.onnx"), None)
    if args.model not in ("auto", "fresh"):
        yield Path(args.model), None, f"ONNX {args.model}"
        return
    if args.model == "auto" and shipped is not None and not args.tiny:
        yield shipped, None, f"shipped {shipped.relative_to(common.REPO)}"
        return
    import torch

    from training.export import export_onnx
    from training.networks import build_network

    torch.manual_seed(0)
    channels = (4, 8, 16) if args.tiny else (8, 16, 32, 64)
    net = build_network(out_channels=1, channels=channels).eval()
    path = work / "model.onnx"
    export_onnx(net, torch.zeros(1, 1, *args.roi), path)
    yield path, net, f"fresh MONAI UNet channels={channels} (seed 0)"


class _AmpTorch:
    """Torch CUDA under autocast (fp16 compute, fp32 output): the AMP path."""

    def __init__(self, net: Any, name: str) -> None:
        import torch

        self.name, self._torch, self._net = name, torch, net.to("cuda").eval()

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self._torch
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16):
            out = self._net(torch.from_numpy(inputs["image"]).to("cuda"))
        return {"logits": out.float().cpu().numpy()}

    def close(self) -> None:
        self._net = None


def _candidates(onnx: Path, net: Any, threads: int) -> list[tuple[str, Callable[[], Backend]]]:
    """(label, factory) for every backend this machine can run; GPU paths only where available."""
    import onnxruntime as ort

    from inference.backends.onnxruntime_backend import OnnxRuntimeBackend

    found: list[tuple[str, Callable[[], Backend]]] = [
        ("ort-cpu", lambda: OnnxRuntimeBackend(onnx, "bench", ["CPUExecutionProvider"], threads))]
    providers = ort.get_available_providers()
    if "CUDAExecutionProvider" in providers:
        found.append(("ort-cuda-iobinding",
                      lambda: OnnxRuntimeBackend(onnx, "bench", ["CUDAExecutionProvider", "CPUExecutionProvider"])))
    if "TensorrtExecutionProvider" in providers:
        found.append(("ort-tensorrt", lambda: OnnxRuntimeBackend(
            onnx, "bench", ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])))
    if net is not None:
        import torch

        from inference.backends.torch_backend import TorchBackend

        if threads:
            torch.set_num_threads(threads)
        found.append(("torch-eager-cpu", lambda: TorchBackend(net, "bench", device="cpu")))
        if torch.cuda.is_available():
            found.append(("torch-cuda-fp32", lambda: TorchBackend(net, "bench", device="cuda")))
            found.append(("torch-cuda-amp", lambda: _AmpTorch(net, "bench")))
    return found


def _triton(stack: ExitStack, onnx: Path, work: Path, threads: int) -> list[tuple[str, Callable[[], Backend]]]:
    try:
        from inference.backends.triton_backend import TritonBackend
    except ImportError as exc:
        common.log(f"triton skipped: {exc}")
        return []
    try:
        ep = stack.enter_context(serve_onnx_model(onnx, "bench", intra_op_threads=threads,
                                                  log_path=work / "tritonserver.log"))
    except TritonUnavailable as exc:
        common.log(f"triton skipped: {str(exc).splitlines()[0]}")
        return []
    found: list[tuple[str, Callable[[], Backend]]] = []
    for proto, url in (("grpc", ep.grpc_url), ("http", ep.http_url)):
        for shm in (False, True):
            label = f"triton-{proto}{'-shm' if shm else ''}"
            found.append((label, lambda u=url, p=proto, s=shm: TritonBackend("bench", u, protocol=p, shared_memory=s)))
    return found


def _volume(shape: tuple[int, int, int]) -> np.ndarray:
    """A smooth random volume in [0, 1] (the model input after windowing)."""
    rng = np.random.default_rng(0)
    coarse = rng.random((max(2, shape[0] // 8), max(2, shape[1] // 8), max(2, shape[2] // 8)), dtype=np.float32)
    from scipy.ndimage import zoom

    vol = zoom(coarse, [s / c for s, c in zip(shape, coarse.shape, strict=True)], order=1)
    return np.clip(vol[: shape[0], : shape[1], : shape[2]], 0, 1).astype(np.float32)


def run(args: argparse.Namespace, out: Path, info: dict[str, Any]) -> dict[str, Any]:
    from inference.sliding_window import sliding_window_infer

    args.shape = tuple(args.shape or ((24, 48, 48) if args.tiny else (96, 192, 192)))
    args.roi = tuple(args.roi or ((16, 32, 32) if args.tiny else (48, 96, 96)))
    repeats = args.repeats or (2 if args.tiny else 3)
    result = common.payload(NAME, info, {
        "volume_shape_zyx": args.shape, "roi_zyx": args.roi, "overlap": args.overlap, "batch": args.batch,
        "repeats": repeats, "warmup": 1, "threads": args.threads or "all", "model": args.model,
        "sliding_window_mode": "gaussian", "triton": not args.no_triton})
    image = _volume(args.shape)
    with tempfile.TemporaryDirectory(prefix="dxgate-bench-") as tmp, ExitStack() as stack:
        onnx, net, description = stack.enter_context(_network(args, Path(tmp)))
        result["settings"]["network"] = description
        backends = _candidates(onnx, net, args.threads)
        if not args.no_triton:
            backends += _triton(stack, onnx, Path(tmp), args.threads)
        reference: np.ndarray | None = None
        for label, factory in common.progress(backends, "backends"):
            row: dict[str, Any] = {"backend": label}
            try:
                backend = factory()
            except Exception as exc:  # a path that cannot run here is reported, not fatal
                row["error"] = f"{type(exc).__name__}: {exc}"
                result["results"].append(row)
                continue
            try:
                def once(b: Backend = backend) -> np.ndarray:
                    return sliding_window_infer(image, b, "image", "logits", args.roi, args.overlap, args.batch, 1)

                t0 = time.perf_counter()
                output = once()
                row["first_call_s"] = time.perf_counter() - t0
                times = []
                for _ in common.progress(range(repeats), label):
                    t0 = time.perf_counter()
                    once()
                    times.append(time.perf_counter() - t0)
                row["latency_s"] = common.stats(times)
                row["volumes_per_s"] = 1.0 / row["latency_s"]["mean"]
                if reference is None:
                    reference = output
                row["max_abs_diff_vs_ort_cpu"] = float(np.max(np.abs(output - reference)))
            except Exception as exc:
                row["error"] = f"{type(exc).__name__}: {exc}"
            finally:
                backend.close()
            common.log(f"{label}: {row.get('latency_s', {}).get('p50', row.get('error'))}")
            result["results"].append(row)
    ok = [r for r in result["results"] if "latency_s" in r]
    result["summary"] = {r["backend"]: {"p50_s": r["latency_s"]["p50"], "max_abs_diff": r["max_abs_diff_vs_ort_cpu"]}
                         for r in ok}
    common.write_json(out / f"{NAME}.json", result)
    rows = [{"backend": r["backend"], "p50 s": r.get("latency_s", {}).get("p50"),
             "p95 s": r.get("latency_s", {}).get("p95"), "first call s": r.get("first_call_s"),
             "volumes/s": r.get("volumes_per_s"), "max abs diff": r.get("max_abs_diff_vs_ort_cpu"),
             "error": r.get("error")} for r in result["results"]]
    common.write_markdown(out / f"{NAME}.md", "Inference latency per volume", result, [
        ("Per-volume sliding-window latency", common.md_table(rows, list(rows[0]) if rows else ["backend"])),
        ("Notes", "Parity is the max absolute difference of the stitched output from ONNX Runtime CPU. "
                  "Triton here serves the model through pytriton's Python backend (an ONNX Runtime session); "
                  "production Triton uses the onnxruntime backend directly.")])
    common.bar_plot(out / f"{NAME}_latency.png", [r["backend"] for r in ok], [r["latency_s"]["p50"] for r in ok],
                    "seconds per volume (p50)", f"Sliding-window inference, volume {args.shape}, roi {args.roi}")
    return result
