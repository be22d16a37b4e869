"""The spool: received instances as Part 10 files, written atomically, one file per SOP instance.

Layout: ``<root>/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm``. Each file is written
to a temporary file in the same folder, flushed and fsync'ed (when enabled), renamed over the final
name with ``os.replace`` and the folder is fsync'ed, so after a crash a file is either complete or
absent. Temporary files a crash leaves behind are removed by :meth:`Spool.cleanup_temp`.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import shutil
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

from dicom_gateway.errors import SpoolFullError, UnparsableDatasetError

log = logging.getLogger("dxgate.spool")

# PS3.5 9.1: a UID is 1-64 characters of digits and dots, components without leading dots. Anything
# else would be unsafe as a path component ("..", "/"), so it is refused before touching the disk.
_UID = re.compile(r"[0-9]+(\.[0-9]+)*")  # used with fullmatch: "$" would accept a trailing newline
CONFLICTS_DIR = "conflicts"
"""Under the spool root: instances re-sent with a known SOP Instance UID but different content."""
_TMP_PREFIX = ".tmp-"
_TMP_SUFFIX = ".part"
_CHUNK = 1 << 20

Payload = bytes | bytearray | memoryview | BinaryIO | Iterable[bytes | bytearray | memoryview]
"""What :meth:`Spool.store` writes: one buffer, a readable binary file, or an iterable of buffers."""


def check_uid(value: str, what: str = "UID") -> str:
    """Return `value` if it is a well-formed UID (digits and dots, ≤ 64 characters), else raise."""
    if not isinstance(value, str) or len(value) > 64 or not _UID.fullmatch(value):
        raise UnparsableDatasetError(f"{what} {value!r} is not a valid UID (PS3.5 9.1)")
    return value


def fsync_dir(path: Path) -> None:
    """fsync a directory so a rename or a new entry in it survives a power cut (POSIX)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, buf: bytes | bytearray | memoryview) -> int:
    """Write a whole buffer to a file descriptor (os.write may write less than asked)."""
    view = memoryview(buf).cast("B")
    total = len(view)
    while view:
        n = os.write(fd, view[:_CHUNK])
        view = view[n:]
    return total


def _write_payload(fd: int, data: Payload) -> int:
    if isinstance(data, bytes | bytearray | memoryview):
        return _write_all(fd, data)
    read = getattr(data, "read", None)
    written = 0
    if callable(read):
        while chunk := read(_CHUNK):
            written += _write_all(fd, chunk)
        return written
    for chunk in data:
        written += _write_all(fd, chunk)
    return written


class Spool:
    """Durable storage of received instances (DESIGN: "The SCP handler only stores")."""

    def __init__(self, root: Path, fsync: bool = True, min_free_bytes: int = 0) -> None:
        self.root = Path(root).absolute()
        self.fsync = fsync
        self.min_free_bytes = min_free_bytes
        self.root.mkdir(parents=True, exist_ok=True)

    def path_for(self, study_uid: str, series_uid: str, sop_instance_uid: str) -> Path:
        """The final path of an instance; raises UnparsableDatasetError for a malformed UID."""
        return (self.root / check_uid(study_uid, "Study Instance UID") / check_uid(series_uid, "Series Instance UID")
                / f"{check_uid(sop_instance_uid, 'SOP Instance UID')}.dcm")

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free

    def check_space(self) -> None:
        """Raise SpoolFullError when free disk is below the watermark (answered 0xA700, PS3.4 B.2.3)."""
        if self.min_free_bytes and self.free_bytes() < self.min_free_bytes:
            raise SpoolFullError(f"free disk under {self.root} is below {self.min_free_bytes} bytes")

    def store(self, study_uid: str, series_uid: str, sop_instance_uid: str, data: Payload) -> Path:
        """Write one instance's Part 10 bytes atomically and return its path.

        `data` is written as given (no decode, no re-encode). An existing file of the same SOP Instance
        UID is replaced atomically. Raises SpoolFullError before writing when the disk is low, and
        OSError (ENOSPC → 0xA700) when the disk fills during the write; the temporary file is removed.
        """
        return self._write_atomic(self.path_for(study_uid, series_uid, sop_instance_uid), data, sop_instance_uid)

    def conflict_path_for(self, study_uid: str, sop_instance_uid: str, content_sha256: str) -> Path:
        """Where a re-sent instance with different content is kept: conflicts/<study>/<sop>.<hash16>.dcm."""
        digest = content_sha256[:16]
        if not re.fullmatch(r"[0-9a-f]{16}", digest):
            raise ValueError("content_sha256 must be a hex SHA-256 digest")
        return (self.root / CONFLICTS_DIR / check_uid(study_uid, "Study Instance UID")
                / f"{check_uid(sop_instance_uid, 'SOP Instance UID')}.{digest}.dcm")

    def store_conflict(self, study_uid: str, sop_instance_uid: str, content_sha256: str, data: Payload) -> Path:
        """Write a conflicting instance's Part 10 bytes atomically (as :meth:`store`) and return its path."""
        return self._write_atomic(self.conflict_path_for(study_uid, sop_instance_uid, content_sha256), data,
                                  sop_instance_uid)

    def _write_atomic(self, final: Path, data: Payload, sop_instance_uid: str) -> Path:
        self.check_space()
        self._make_dirs(final.parent)
        tmp = final.with_name(f"{_TMP_PREFIX}{final.stem}.{uuid.uuid4().hex}{_TMP_SUFFIX}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            try:
                _write_payload(fd, data)
                if self.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, final)
        except BaseException as exc:
            _unlink_quietly(tmp)
            if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
                log.error("spool disk full while writing", extra={"sop_instance_uid": sop_instance_uid})
                raise OSError(errno.ENOSPC, f"no space left writing {final.name}") from exc
            raise
        if self.fsync:
            fsync_dir(final.parent)
        return final

    def remove(self, path: Path) -> None:
        """Remove a spooled file (used when recording it failed, so nothing unrecorded stays)."""
        _unlink_quietly(path)
        if self.fsync and path.parent.is_dir():
            fsync_dir(path.parent)

    def cleanup_temp(self) -> int:
        """At start-up: remove temporary files left by a crash mid-write; returns how many."""
        removed = 0
        for tmp in self.root.rglob(f"{_TMP_PREFIX}*{_TMP_SUFFIX}"):
            if tmp.is_file():
                _unlink_quietly(tmp)
                removed += 1
        if removed:
            log.warning("removed %d partial file(s) left in the spool by an unclean stop", removed)
        return removed

    def instance_files(self) -> Iterator[Path]:
        """Every instance file in the spool layout (``<study>/<series>/<SOP Instance UID>.dcm``), no temp files."""
        for path in self.root.glob("*/*/*.dcm"):
            if not path.name.startswith(_TMP_PREFIX) and path.is_file():
                yield path

    def _make_dirs(self, folder: Path) -> None:
        """Create study/series folders; fsync each parent that got a new entry."""
        missing: list[Path] = []
        p = folder
        while not p.is_dir() and p != self.root:
            missing.append(p)
            p = p.parent
        for d in reversed(missing):
            try:
                d.mkdir()
            except FileExistsError:
                continue
            if self.fsync:
                fsync_dir(d.parent)


def _unlink_quietly(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
