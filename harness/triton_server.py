"""Start a real Triton Inference Server that serves an ONNX model on loopback.

PyPI's `nvidia-pytriton` bundles a real `tritonserver` (2.51) with the Python backend only, so the
model is served through pytriton: an infer function running an ONNX Runtime session on the same
model.onnx. Production serves models/<name>/ directly with the onnxruntime backend (see
docs/deployment.md); the wire protocol the client sees is the same.

The Python stub bundled with Triton 2.51 is built with a pybind11 that predates NumPy 2: under
NumPy >= 2 its `as_numpy()` / `Tensor(name, array)` silently carry empty or garbage data. So the stub
gets its own tiny environment (a venv holding numpy<2, with a .pth to this interpreter's
site-packages), created once under ~/.cache/dxgate (or $DXGATE_TRITON_STUB_ENV) with pip; the
serving process itself keeps this interpreter's NumPy (tensors cross as raw shared-memory bytes).

Run as a module (`python -m harness.triton_server --model model.onnx --name NAME --grpc-port ...`) or
use `serve_onnx_model(...)`, a context manager that starts the module in a subprocess with the
environment the Python stub needs (LD_LIBRARY_PATH = the interpreter's LIBDIR) and stops it.
Used by tests/integration/test_triton_backend.py and the inference and end-to-end benchmarks.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from harness.system import free_port, log_tail


class TritonUnavailable(RuntimeError):
    """The tritonserver binary could not be started here (pytriton missing, stub cannot load, ...)."""


@dataclass(frozen=True)
class TritonEndpoints:
    model_name: str
    grpc_url: str  # host:port
    http_url: str  # host:port
    pid: int


def triton_env() -> dict[str, str]:
    """The environment in which pytriton's Python stub can load this interpreter's libpython."""
    env = dict(os.environ)
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (libdir, env.get("LD_LIBRARY_PATH", "")) if p)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def stub_env_dir() -> Path | None:
    """A Python environment for Triton's Python stub with numpy<2; None when this NumPy is already 1.x."""
    import numpy as np

    if int(np.__version__.split(".")[0]) < 2:
        return None
    root = Path(os.environ.get("DXGATE_TRITON_STUB_ENV") or Path.home() / ".cache" / "dxgate" / "triton-stub")
    env_dir = root / f"py{sys.version_info.major}{sys.version_info.minor}"
    site = env_dir / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    marker = env_dir / ".complete"
    if marker.exists():
        return env_dir
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # parallel tests / benchmarks create it once
        if not marker.exists():
            shutil.rmtree(env_dir, ignore_errors=True)
            try:
                subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True)
                subprocess.run(
                    [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), "numpy<2"],
                    check=True, capture_output=True, timeout=300,
                )
            except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as exc:
                raise TritonUnavailable(f"cannot prepare the Triton Python stub environment: {exc}") from exc
            import pytriton

            (site / "zz_dxgate_parent_site.pth").write_text(str(Path(pytriton.__file__).parents[1]) + "\n")
            marker.touch()
    return env_dir


def _ready(http_url: str, model_name: str) -> bool:
    try:
        with urllib.request.urlopen(f"http://{http_url}/v2/models/{model_name}/ready", timeout=1) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


@contextlib.contextmanager
def serve_onnx_model(
    model_path: Path,
    model_name: str,
    *,
    max_batch_size: int = 4,
    intra_op_threads: int = 1,
    startup_timeout_s: float = 60.0,
    log_path: Path | None = None,
) -> Iterator[TritonEndpoints]:
    """Serve `model_path` as `model_name` through a real tritonserver on free loopback ports.

    Raises TritonUnavailable (with the server's log tail) when the server does not become ready.
    """
    try:
        import pytriton  # noqa: F401
    except ImportError as exc:
        raise TritonUnavailable(f"nvidia-pytriton is not installed: {exc}") from exc
    stub_env = stub_env_dir()
    http_port, grpc_port, metrics_port = free_port(), free_port(), free_port()
    workspace = Path(tempfile.mkdtemp(prefix="dxgate-triton-"))
    cmd = [
        sys.executable, "-m", "harness.triton_server", "--model", str(model_path), "--name", model_name,
        "--http-port", str(http_port), "--grpc-port", str(grpc_port), "--metrics-port", str(metrics_port),
        "--max-batch-size", str(max_batch_size), "--threads", str(intra_op_threads),
        "--workspace", str(workspace / "ws"), *(["--stub-env", str(stub_env)] if stub_env else []),
    ]
    log = log_path or Path(os.devnull)
    with open(log, "wb") as log_file:
        proc = subprocess.Popen(
            cmd, env=triton_env(), stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
        )
    endpoints = TritonEndpoints(model_name, f"127.0.0.1:{grpc_port}", f"127.0.0.1:{http_port}", proc.pid)
    try:
        deadline = time.monotonic() + startup_timeout_s
        while not _ready(endpoints.http_url, model_name):
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = log_tail(log_path, 2000) if log_path else "(no log kept)"
                raise TritonUnavailable(f"tritonserver did not become ready (exit={proc.poll()}):\n{tail}")
            time.sleep(0.25)
        yield endpoints
    finally:
        _stop(proc)
        shutil.rmtree(workspace, ignore_errors=True)


def _children(pid: int) -> list[int]:
    """Direct children of `pid` (the tritonserver process pytriton started), from /proc."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
    return found


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGINT the pytriton process group (it stops tritonserver), then SIGKILL what is left.

    The Python backend's shared-memory pool (/dev/shm/pytrtion<server pid>-*) and its model copy
    (/tmp/folderXXXXXX, holding the pytriton model.py) can outlive the server; both are removed.
    """
    servers = _children(proc.pid)
    model_copies = {d for pid in servers for d in _model_copies(pid)}
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=15)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)
    for pid in servers:
        for leftover in Path("/dev/shm").glob(f"pytrtion{pid}-*"):
            with contextlib.suppress(OSError):
                leftover.unlink()
    for folder in model_copies:
        shutil.rmtree(folder, ignore_errors=True)


def _model_copies(server_pid: int) -> list[Path]:
    """/tmp/folderXXXXXX directories the server's Python stubs load their model.py from."""
    found = []
    for stub in _children(server_pid):
        with contextlib.suppress(OSError):
            args = Path(f"/proc/{stub}/cmdline").read_bytes().split(b"\0")
            if len(args) > 1 and args[1].startswith(b"/tmp/folder"):
                found.append(Path(args[1].decode()).parents[1])
    return found


def _serve(args: argparse.Namespace) -> None:
    import numpy as np
    import onnxruntime as ort
    from pytriton.decorators import batch
    from pytriton.model_config import ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig

    if args.stub_env:
        import pytriton.server.triton_server as triton_server

        # pytriton puts <env>/bin first on the server's PATH; the stub derives sys.path from it.
        triton_server.get_triton_python_backend_python_env = lambda: Path(args.stub_env)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads
    opts.inter_op_num_threads = 1
    session = ort.InferenceSession(args.model, opts, providers=["CPUExecutionProvider"])
    in_names = [i.name for i in session.get_inputs()]
    out_names = [o.name for o in session.get_outputs()]
    # Dims after the batch axis as in config.pbtxt: fixed where the ONNX graph fixes them, else -1.
    dims = {t.name: tuple(d if isinstance(d, int) else -1 for d in t.shape[1:])
            for t in [*session.get_inputs(), *session.get_outputs()]}

    @batch
    def infer(**inputs: np.ndarray) -> dict[str, np.ndarray]:
        feeds = {name: np.ascontiguousarray(inputs[name], dtype=np.float32) for name in in_names}
        return dict(zip(out_names, session.run(out_names, feeds), strict=True))

    config = TritonConfig(
        http_address="127.0.0.1", http_port=args.http_port, grpc_address="127.0.0.1",
        grpc_port=args.grpc_port, metrics_address="127.0.0.1", metrics_port=args.metrics_port,
        allow_sagemaker=False, allow_vertex_ai=False, allow_gpu_metrics=False, exit_timeout_secs=2,
    )
    with Triton(config=config, workspace=args.workspace) as triton:
        triton.bind(
            model_name=args.name,
            infer_func=infer,
            inputs=[Tensor(name=n, dtype=np.float32, shape=dims[n]) for n in in_names],
            outputs=[Tensor(name=n, dtype=np.float32, shape=dims[n]) for n in out_names],
            config=ModelConfig(max_batch_size=args.max_batch_size),
            strict=True,
        )
        triton.serve()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--http-port", type=int, required=True)
    p.add_argument("--grpc-port", type=int, required=True)
    p.add_argument("--metrics-port", type=int, required=True)
    p.add_argument("--max-batch-size", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--workspace", default=None)
    p.add_argument("--stub-env", default=None)
    _serve(p.parse_args(argv))


if __name__ == "__main__":
    main()
