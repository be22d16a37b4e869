"""The image size a compressed frame declares, read from its codestream header before any decoder runs.

A decoder allocates what the codestream declares, not what Rows and Columns say: a 2 KB JPEG 2000 frame whose SIZ
marker claims 65535 x 65535 inside a 512 x 512 image makes OpenJPEG allocate gigabytes. `check_frame_size` reads
the declared size (JPEG 2000 Part 1 A.5.1 SIZ, also used by High-Throughput JPEG 2000, ISO/IEC 15444-15; JPEG
ISO/IEC 10918-1 B.2.2 and JPEG-LS ISO/IEC 14495-1 C.2.2 SOF) and refuses a frame that disagrees with the data
set's Rows and Columns (PS3.5 8.2: the compressed frame's dimensions are those of the image).
"""

from __future__ import annotations

import struct
from pathlib import Path

from pydicom import dcmread
from pydicom.encaps import generate_frames
from pydicom.uid import UID, JPEG2000TransferSyntaxes, JPEGLSTransferSyntaxes, JPEGTransferSyntaxes

from inference.errors import VolumeError

J2K_SYNTAXES = frozenset(JPEG2000TransferSyntaxes)      # Part 1, Part 2 multi-component and HTJ2K
JPEG_SYNTAXES = frozenset(JPEGTransferSyntaxes + JPEGLSTransferSyntaxes)
CHECKED_SYNTAXES = J2K_SYNTAXES | JPEG_SYNTAXES

_SOC_SIZ = b"\xff\x4f\xff\x51"                 # start of codestream, then the image and tile size marker
_JP2_SIGNATURE = b"\x00\x00\x00\x0cjP  \r\n\x87\n"
_SOF = {bytes([0xFF, m]) for m in (*range(0xC0, 0xC4), *range(0xC5, 0xC8), *range(0xC9, 0xCC),
                                   *range(0xCD, 0xD0), 0xF7)}
_STANDALONE = {bytes([0xFF, m]) for m in (0x01, *range(0xD0, 0xD8))}


class FrameSizeError(VolumeError):
    """A compressed frame declares a size other than the image's Rows x Columns, or none."""


def j2k_size(frame: bytes) -> tuple[int, int, int]:
    """(rows, columns, components) declared by a JPEG 2000 codestream's SIZ marker (A.5.1): Ysiz - YOsiz,
    Xsiz - XOsiz, Csiz. A JP2 file wrapper (Annex I) is looked through. Raises FrameSizeError without SIZ."""
    start = 0
    if frame.startswith(_JP2_SIGNATURE):
        start = frame.find(_SOC_SIZ)
    if start < 0 or frame[start:start + 4] != _SOC_SIZ or len(frame) < start + 42:
        raise FrameSizeError("JPEG 2000 frame has no SIZ marker at the start of its codestream")
    xsiz, ysiz, xosiz, yosiz = struct.unpack(">IIII", frame[start + 8:start + 24])
    (csiz,) = struct.unpack(">H", frame[start + 40:start + 42])
    if xosiz >= xsiz or yosiz >= ysiz:
        raise FrameSizeError("JPEG 2000 frame declares an empty image area in its SIZ marker")
    return ysiz - yosiz, xsiz - xosiz, csiz


def jpeg_size(frame: bytes) -> tuple[int, int, int]:
    """(rows, columns, components) declared by a JPEG or JPEG-LS frame header (SOFn / SOF55)."""
    if not frame.startswith(b"\xff\xd8"):
        raise FrameSizeError("JPEG frame does not start with an SOI marker")
    offset = 2
    while offset + 4 <= len(frame):
        marker = frame[offset:offset + 2]
        if marker[0] != 0xFF:
            break
        if marker == b"\xff\xff":          # fill byte before a marker (B.1.1.2)
            offset += 1
            continue
        if marker in _STANDALONE:
            offset += 2
            continue
        (length,) = struct.unpack(">H", frame[offset + 2:offset + 4])
        if marker in _SOF and offset + 10 <= len(frame):
            rows, columns = struct.unpack(">HH", frame[offset + 5:offset + 9])
            return rows, columns, frame[offset + 9]
        offset += 2 + length
    raise FrameSizeError("JPEG frame has no frame header (SOF) before its scan")


def check_frame_size(path: Path, transfer_syntax: str) -> None:
    """Refuse `path` when its first compressed frame declares a size other than Rows x Columns.

    Only the encapsulated bytes are read (their size is bounded by what the gateway accepts per data set);
    nothing is decoded. Transfer syntaxes outside `CHECKED_SYNTAXES` are left to pydicom, which sizes its
    output from Rows and Columns (native and RLE, PS3.5 Annex G).
    """
    syntax = UID(transfer_syntax)
    if syntax not in CHECKED_SYNTAXES:
        return
    ds = dcmread(path, specific_tags=["Rows", "Columns", "SamplesPerPixel", "NumberOfFrames", "PixelData"])
    try:
        frame = next(generate_frames(ds.PixelData, number_of_frames=int(ds.get("NumberOfFrames", 1) or 1)))
    except (StopIteration, ValueError, KeyError, AttributeError) as exc:
        raise FrameSizeError(f"{path.name}: encapsulated pixel data has no readable frame "
                             f"({type(exc).__name__})") from exc
    try:
        rows, columns, components = (j2k_size if syntax in J2K_SYNTAXES else jpeg_size)(frame)
    except FrameSizeError as exc:
        raise FrameSizeError(f"{path.name}: {exc}; refused before decoding") from exc
    expected = (int(ds.get("Rows", 0)), int(ds.get("Columns", 0)), int(ds.get("SamplesPerPixel", 1)))
    if (rows, columns, components) != expected:
        raise FrameSizeError(
            f"{path.name}: the compressed frame declares {rows}x{columns} with {components} component(s), the "
            f"image is {expected[0]}x{expected[1]} with {expected[2]}; refused before decoding")
