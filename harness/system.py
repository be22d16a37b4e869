"""Ports, system tools and processes for the harness."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

SYSTEM_DIRS = ("/usr/bin", "/usr/sbin", "/usr/local/bin")


class ToolMissing(FileNotFoundError):
    """A system tool (dcmtk, dicom3tools, Orthanc) is not installed here."""


class StartError(RuntimeError):
    """A server this harness started did not come up (the message carries its log tail)."""


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _is_script(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == b"#!"


def system_tool(name: str) -> str:
    """Path of the installed binary `name`, never a same-named Python entry-point script.

    pynetdicom installs `storescp`, `storescu`, `echoscu`, ... into the virtualenv's bin/, which comes
    first on PATH once it is activated; those scripts are skipped, so dcmtk's binaries are found.
    `$DCMTK_BIN` (a folder) is searched first when set. Raises ToolMissing when there is none.
    """
    venv_bin = os.path.abspath(os.path.dirname(sys.executable))
    dirs = [os.environ["DCMTK_BIN"]] if os.environ.get("DCMTK_BIN") else []
    dirs += [d for d in os.environ.get("PATH", "").split(os.pathsep) if d and os.path.abspath(d) != venv_bin]
    for d in [*dirs, *SYSTEM_DIRS]:
        path = shutil.which(name, path=d)
        if path is not None and not _is_script(path):
            return path
    raise ToolMissing(f"{name} is not installed (the CI script installs it; dcmtk: apt-get install dcmtk)")


def stop_process(proc: subprocess.Popen, timeout_s: float = 15.0) -> None:
    """SIGTERM, then SIGKILL after `timeout_s`: only the process the harness started."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def log_tail(path: Path, chars: int | None = 4000) -> str:
    """The end of a server's log file, all of it for chars=None ('' when there is none yet)."""
    text = path.read_text(errors="replace") if path.exists() else ""
    return text if chars is None else text[-chars:]
