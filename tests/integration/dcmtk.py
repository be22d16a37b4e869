"""Real dcmtk peers for tests: `storescp` into a folder, `storescu`, `echoscu`, all on 127.0.0.1.

pynetdicom installs Python apps with the same names (`storescp`, `storescu`, `echoscu`) into the
virtual environment's bin/, which comes first on PATH; `dcmtk_tool` skips those scripts and finds the
dcmtk binaries (Debian package `dcmtk`). Every tool runs with TCP_NODELAY=1 in its environment.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def dcmtk_tool(name: str) -> str:
    """Path of the dcmtk executable `name` (not pynetdicom's Python script); skips the test if absent."""
    dirs = os.environ.get("PATH", "").split(os.pathsep) + ["/usr/bin", "/usr/local/bin"]
    for d in dirs:
        path = shutil.which(name, path=d) if d else None
        if path is None:
            continue
        with open(path, "rb") as f:
            if f.read(2) != b"#!":  # a Python entry-point script, not the dcmtk binary
                return path
    pytest.skip(f"dcmtk {name} is not installed (apt-get install dcmtk; the CI script does)")


def dcmtk_env() -> dict[str, str]:
    return {**os.environ, "TCP_NODELAY": "1"}


def run_echoscu(port: int, called_ae: str, calling_ae: str = "ECHOSCU", timeout_s: float = 5.0,
                host: str = "127.0.0.1") -> subprocess.CompletedProcess[str]:
    """C-ECHO (Verification, PS3.7 9.1.5) with dcmtk echoscu."""
    t = str(max(1, int(timeout_s)))
    return subprocess.run([dcmtk_tool("echoscu"), "-to", t, "-ta", t, "-td", t, "-aet", calling_ae,
                           "-aec", called_ae, host, str(port)], capture_output=True, text=True,
                          env=dcmtk_env(), timeout=timeout_s + 10)


def wait_for_port(port: int, called_ae: str, timeout_s: float = 10.0, calling_ae: str = "ECHOSCU",
                  alive: Callable[[], bool] = lambda: True) -> None:
    """Wait until a DICOM node answers C-ECHO on the port (raises TimeoutError, or RuntimeError if the
    server process, as told by `alive`, has exited)."""
    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        if not alive():
            raise RuntimeError(f"the DICOM server for port {port} exited before answering")
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


def run_storescu(files: Sequence[Path], port: int, called_ae: str, calling_ae: str = "STORESCU",
                 extra: Sequence[str] = (), timeout_s: float = 30.0) -> subprocess.CompletedProcess[str]:
    """C-STORE files with dcmtk storescu (one association). `extra` e.g. ["-xr"] to propose RLE."""
    t = str(max(1, int(timeout_s)))
    return subprocess.run([dcmtk_tool("storescu"), "-to", t, "-ta", t, "-td", t, "-aet", calling_ae,
                           "-aec", called_ae, *extra, "127.0.0.1", str(port), *map(str, files)],
                          capture_output=True, text=True, env=dcmtk_env(), timeout=timeout_s + 10)


@dataclass
class StoreSCP:
    """A running dcmtk storescp writing every received instance into `out_dir`."""

    port: int
    ae_title: str
    out_dir: Path
    process: subprocess.Popen[bytes]

    def files(self) -> list[Path]:
        return sorted(p for p in self.out_dir.rglob("*") if p.is_file())

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)


def start_storescp(out_dir: Path, port: int | None = None, ae_title: str = "STORESCP",
                   extra: Sequence[str] = (), attempts: int = 3) -> StoreSCP:
    """Start dcmtk storescp on 127.0.0.1 (accepting all transfer syntaxes, +xa) and wait for it.

    Without a given port a free one is picked; if another process takes it first (storescp exits
    on the failed bind) a new port is tried, so the C-ECHO never reaches someone else's server.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    for attempt in range(attempts):
        use = port or free_port()
        log_path = out_dir.parent / f"storescp-{use}.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen([dcmtk_tool("storescp"), "--aetitle", ae_title, "+xa", "-od", str(out_dir),
                                     "-ta", "5", "-td", "5", *extra, str(use)],
                                    stdout=log, stderr=subprocess.STDOUT, env=dcmtk_env())
        scp = StoreSCP(port=use, ae_title=ae_title, out_dir=out_dir, process=proc)
        try:
            time.sleep(0.05)  # a failed bind exits at once
            wait_for_port(use, ae_title, alive=lambda p=proc: p.poll() is None)
            if proc.poll() is None:
                return scp
        except RuntimeError:
            if port is not None or attempt == attempts - 1:
                raise RuntimeError(f"storescp exited: {log_path.read_text(errors='replace')[-2000:]}") from None
        except BaseException:
            scp.stop()
            raise
        scp.stop()
    raise RuntimeError(f"storescp could not be started on a free port ({attempts} attempts)")


@contextmanager
def storescp(out_dir: Path, port: int | None = None, ae_title: str = "STORESCP",
             extra: Sequence[str] = ()) -> Iterator[StoreSCP]:
    """Context manager around `start_storescp`; the process is always stopped."""
    scp = start_storescp(out_dir, port, ae_title, extra)
    try:
        yield scp
    finally:
        scp.stop()
