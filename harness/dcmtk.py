"""Real dcmtk peers on 127.0.0.1: `storescp` into a folder, `storescu`, `echoscu`.

Every tool is dcmtk's own binary (`system.system_tool`, never pynetdicom's same-named scripts) and runs
with TCP_NODELAY=1 in its environment (dcmtk/dcmnet/docs/envvars.txt).
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pydicom

from harness.system import StartError, free_port, log_tail, stop_process, system_tool


def dcmtk_env() -> dict[str, str]:
    """This process's environment with TCP_NODELAY=1 for dcmtk."""
    return {**os.environ, "TCP_NODELAY": "1"}


DCMTK_ENV = dcmtk_env()


def _timeouts(timeout_s: float) -> list[str]:
    t = str(max(1, int(timeout_s)))
    return ["-to", t, "-ta", t, "-td", t]


def run_echoscu(port: int, called_ae: str, calling_ae: str = "ECHOSCU",
                timeout_s: float = 5.0) -> subprocess.CompletedProcess[str]:
    """C-ECHO (Verification, PS3.7 9.1.5) with dcmtk echoscu; the completed process, never raises."""
    return subprocess.run([system_tool("echoscu"), *_timeouts(timeout_s), "-aet", calling_ae, "-aec", called_ae,
                           "127.0.0.1", str(port)], capture_output=True, text=True, env=dcmtk_env(),
                          timeout=timeout_s + 10)


def wait_for_echo(port: int, called_ae: str, timeout_s: float = 20.0, calling_ae: str = "ECHOSCU",
                  alive: Callable[[], bool] = lambda: True) -> None:
    """Wait until a DICOM node on 127.0.0.1:port answers C-ECHO.

    Raises TimeoutError, or StartError when the server process (as told by `alive`) has exited.
    """
    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        if not alive():
            raise StartError(f"the DICOM server for port {port} exited before answering C-ECHO")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                pass
        except OSError as exc:
            last = str(exc)
            time.sleep(0.05)
            continue
        res = run_echoscu(port, called_ae, calling_ae=calling_ae, timeout_s=2)
        if res.returncode == 0:
            return
        last = res.stderr
        time.sleep(0.1)
    raise TimeoutError(f"no DICOM node answering C-ECHO on port {port}: {last}")


def run_storescu(files: Path | Sequence[Path], port: int, called_ae: str, calling_ae: str = "STORESCU",
                 extra: Sequence[str] = (), timeout_s: float = 30.0,
                 verbose: bool = False) -> subprocess.CompletedProcess[str]:
    """C-STORE with dcmtk storescu over one association; the completed process, never raises.

    `files` is a list of files or one folder (sent with `--scan-directories --recurse`, `*.dcm` only);
    `extra` e.g. ["-xr"] to propose RLE Lossless.
    """
    args = [system_tool("storescu"), *(["-v"] if verbose else []), *_timeouts(timeout_s), "-aet", calling_ae,
            "-aec", called_ae, *extra]
    if isinstance(files, Path) and files.is_dir():
        args += ["--scan-directories", "--recurse", "--scan-pattern", "*.dcm", "127.0.0.1", str(port), str(files)]
    else:
        args += ["127.0.0.1", str(port), *map(str, [files] if isinstance(files, Path) else files)]
    return subprocess.run(args, capture_output=True, text=True, env=dcmtk_env(), timeout=timeout_s + 10)


def storescu(files: Path | Sequence[Path], port: int, called_ae: str, calling_ae: str = "PACS", *extra: str,
             check: bool = True, timeout_s: float = 300.0) -> subprocess.CompletedProcess[str]:
    """`run_storescu` with -v that, with `check`, raises AssertionError (stderr tail) on a non-zero exit."""
    res = run_storescu(files, port, called_ae, calling_ae, extra, timeout_s=timeout_s, verbose=True)
    if check and res.returncode != 0:
        raise AssertionError(f"storescu failed ({res.returncode}): {res.stderr[-2000:]}")
    return res


@dataclass
class StoreSCP:
    """A running dcmtk storescp writing every received instance into `out_dir`."""

    port: int
    ae_title: str
    out_dir: Path
    process: subprocess.Popen[bytes]

    def files(self) -> list[Path]:
        return sorted(p for p in self.out_dir.rglob("*") if p.is_file())

    def datasets(self) -> list[pydicom.Dataset]:
        return [pydicom.dcmread(p) for p in self.files()]

    def stop(self) -> None:
        stop_process(self.process, timeout_s=5)


def start_storescp(out_dir: Path, ae_title: str = "STORESCP", port: int | None = None,
                   extra: Sequence[str] = (), attempts: int = 3) -> StoreSCP:
    """Start dcmtk storescp on 127.0.0.1 (accepting every transfer syntax, +xa) and wait for C-ECHO.

    Without a given port a free one is picked; if another process takes it first (storescp exits on the
    failed bind) a new port is tried, so the C-ECHO never reaches someone else's server. `extra` e.g.
    ["--fork"] for one process per association. The log is `<out_dir>/../storescp-<port>.log`.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    for attempt in range(attempts):
        use = port or free_port()
        log_path = out_dir.parent / f"storescp-{use}.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen([system_tool("storescp"), "--aetitle", ae_title, "+xa", "-od", str(out_dir),
                                     "-ta", "5", "-td", "5", *extra, str(use)],
                                    stdout=log, stderr=subprocess.STDOUT, env=dcmtk_env())
        scp = StoreSCP(port=use, ae_title=ae_title, out_dir=out_dir, process=proc)
        try:
            time.sleep(0.05)  # a failed bind exits at once
            wait_for_echo(use, ae_title, alive=lambda p=proc: p.poll() is None)
            if proc.poll() is None:
                return scp
        except StartError:
            if port is not None or attempt == attempts - 1:
                raise StartError(f"storescp exited: {log_tail(log_path, 2000)}") from None
        except BaseException:
            scp.stop()
            raise
        scp.stop()
    raise StartError(f"storescp could not be started on a free port ({attempts} attempts)")


@contextmanager
def storescp(out_dir: Path, ae_title: str = "STORESCP", port: int | None = None,
             extra: Sequence[str] = ()) -> Iterator[StoreSCP]:
    """Context manager around `start_storescp`; the process is always stopped."""
    scp = start_storescp(out_dir, ae_title, port, extra)
    try:
        yield scp
    finally:
        scp.stop()
