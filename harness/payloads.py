"""Hostile data set bytes: raw explicit-VR elements that may lie, sequences nested to any depth, and a
deflate bomb built streaming (nothing of its inflated size is ever held).
"""

from __future__ import annotations

import struct
import zlib

_LONG_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "UC", "UN", "UR", "UT"}


def element(group: int, elem: int, vr: str, value: bytes, length: int | None = None) -> bytes:
    """One explicit VR little endian element (PS3.5 7.1.2); `length` may lie about the value's size."""
    n = len(value) if length is None else length
    if vr in _LONG_VRS:
        return struct.pack("<HH2sHI", group, elem, vr.encode(), 0, n) + value
    return struct.pack("<HH2sH", group, elem, vr.encode(), n) + value


def nested_sequences(depth: int) -> bytes:
    """Content Sequence (0040,A730) nested `depth` deep, undefined lengths and delimiters (PS3.5 7.5)."""
    open_ = struct.pack("<HH2sHI", 0x0040, 0xA730, b"SQ", 0, 0xFFFFFFFF) + struct.pack("<HHI", 0xFFFE, 0xE000,
                                                                                          0xFFFFFFFF)
    close = struct.pack("<HHI", 0xFFFE, 0xE00D, 0) + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    return open_ * depth + close * depth


def deflate_bomb(header: bytes, inflated_bytes: int, chunk: int = 16 * 1024 * 1024) -> bytes:
    """A raw deflate stream (Deflated Explicit VR LE, PS3.5 A.5) of `header` then private OB elements of
    zeros, `inflated_bytes` in all once inflated. Built streaming: each chunk of zeros follows a full
    flush, so its compressed form is computed once and repeated; nothing of the inflated size is held.
    """
    comp = zlib.compressobj(9, zlib.DEFLATED, -15)
    out = [comp.compress(header) + comp.flush(zlib.Z_FULL_FLUSH)]
    per_element = (0xFFFFFFF0 // chunk) * chunk  # under the 32-bit length of one OB value
    remaining, elem = inflated_bytes, 0x1000
    zeros = bytes(chunk)
    creator = element(0x0011, 0x0010, "LO", b"HOSTILE ")
    out.append(comp.compress(creator) + comp.flush(zlib.Z_FULL_FLUSH))
    block: bytes | None = None
    while remaining > 0:
        size = min(per_element, -(-remaining // chunk) * chunk)
        out.append(comp.compress(element(0x0011, elem, "OB", b"", length=size)) + comp.flush(zlib.Z_FULL_FLUSH))
        for _ in range(size // chunk):
            if block is None:
                block = comp.compress(zeros) + comp.flush(zlib.Z_FULL_FLUSH)
            out.append(block)
        remaining -= size
        elem += 1
    out.append(comp.flush())
    return b"".join(out)
