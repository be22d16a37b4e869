"""The outbox: each job's results as Part 10 files in ``<outbox>/<job id>/``, written so a crash leaves
each file complete or absent, and the folder entries durable before the job store records them.

A file is written to a temporary name, fsync'ed, renamed over its final name; then the job's folder
and the outbox itself (which got the folder's entry) are fsync'ed. At start-up, files and folders that
no job references (a crash between the write and the commit, or a worker that lost its lease) are
removed by :func:`remove_unreferenced`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import uuid
from collections.abc import Iterable
from pathlib import Path

import pydicom

from dicom_gateway.receive.spool import fsync_dir

log = logging.getLogger("dxgate.outbox")

_TMP_SUFFIX = ".tmp"


def job_folder(outbox: Path, job_id: int, fsync: bool) -> Path:
    """``<outbox>/<job id>/``, created if missing (the outbox fsync'ed for the new entry)."""
    folder = outbox / str(job_id)
    if not folder.is_dir():
        folder.mkdir(parents=True, exist_ok=True)
        if fsync:
            fsync_dir(outbox)
    return folder


def write_atomic(path: Path, ds: pydicom.Dataset, fsync: bool) -> None:
    """Write one dataset as a Part 10 file (PS3.10 7.1) under its final name, atomically."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}{_TMP_SUFFIX}")
    try:
        ds.save_as(tmp, enforce_file_format=True)
        if fsync:
            with tmp.open("rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def sync_folder(folder: Path) -> None:
    """fsync a job's folder and its parent, so the renames and the folder's own entry survive a power cut."""
    fsync_dir(folder)
    fsync_dir(folder.parent)


def remove_files(paths: Iterable[Path]) -> int:
    """Remove the files a worker wrote (its results are dropped); returns how many were there."""
    removed = 0
    for p in paths:
        with contextlib.suppress(FileNotFoundError):
            Path(p).unlink()
            removed += 1
    return removed


def remove_unreferenced(outbox: Path, referenced: set[Path]) -> int:
    """At start-up, before any worker runs: remove every file under the outbox not in `referenced` (the
    outputs the job store records), then the folders left empty; returns how many files were removed."""
    if not outbox.is_dir():
        return 0
    keep = {p.absolute() for p in referenced}
    removed = 0
    for folder in sorted((p for p in outbox.iterdir() if p.is_dir()), key=lambda p: p.name):
        for f in folder.iterdir():
            if f.is_file() and f.absolute() not in keep:
                f.unlink()
                removed += 1
        with contextlib.suppress(OSError):  # not empty: it holds a job's results
            folder.rmdir()
    if removed:
        log.warning("removed %d outbox file(s) no job references (left by an unclean stop)", removed,
                    extra={"count": removed})
    return removed
