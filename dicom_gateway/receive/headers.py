"""Cheap header parsing of received instances: identity, routing fields and image orientation.

Nothing here decodes pixel data. Values larger than a few KiB are skipped, not read, and the structure
of the whole data set is checked (every element ends inside the received bytes), so a truncated or
garbled data set is refused (0xC210) instead of being acknowledged and failing later in inference.
Only UIDs and technical attributes are returned; patient attributes are never read into the record.
"""

from __future__ import annotations

import io
import math
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian

from dicom_gateway.errors import DatasetTooLargeError, MissingIdentifierError, UnparsableDatasetError
from dicom_gateway.store import InstanceRecord

DEFER_SIZE = 4096
"""Values larger than this are skipped while parsing a header (pixel data, large private blobs)."""

OBLIQUE_TOLERANCE_DEG = 25.0
"""A slice normal within this angle of a patient axis is axial / coronal / sagittal, else oblique."""

MAX_NESTING = 64
"""Deepest sequence nesting accepted (real images use a handful of levels; SR content trees a few dozen)."""

INFLATE_CHUNK = 1 << 20
"""A Deflated data set is inflated this many bytes at a time (PS3.5 A.5)."""

_UNDEFINED = 0xFFFFFFFF


def _finite(value: Sequence[Any] | None, n: int) -> list[float] | None:
    """`n` finite numbers from a multi-valued attribute, or None when missing or malformed."""
    try:
        v = [float(x) for x in value] if value is not None else []
    except (TypeError, ValueError):
        return None
    return v if len(v) == n and all(math.isfinite(x) for x in v) else None


def slice_normal(iop: Sequence[Any] | None) -> tuple[float, float, float] | None:
    """The unit slice normal, row × column direction cosines of Image Orientation (Patient) (0020,0037)
    (PS3.3 C.7.6.2.1.1, LPS patient axes); None when the value is missing, malformed or degenerate."""
    v = _finite(iop, 6)
    if v is None:
        return None
    r, c = v[:3], v[3:]
    n = (r[1] * c[2] - r[2] * c[1], r[2] * c[0] - r[0] * c[2], r[0] * c[1] - r[1] * c[0])
    norm = math.sqrt(sum(x * x for x in n))
    if norm < 1e-6:
        return None
    return (n[0] / norm, n[1] / norm, n[2] / norm)


def classify_orientation(iop: Sequence[Any] | None, tolerance_deg: float = OBLIQUE_TOLERANCE_DEG) -> str | None:
    """Classify Image Orientation (Patient) as axial, coronal, sagittal or oblique.

    A slice normal along ±Z (head-foot) is axial, along ±Y (anterior-posterior) coronal, along ±X
    (left-right) sagittal. Returns None when the value is missing or malformed.
    """
    n = slice_normal(iop)
    if n is None:
        return None
    axis = max(range(3), key=lambda i: abs(n[i]))
    if abs(n[axis]) < math.cos(math.radians(tolerance_deg)):
        return "oblique"
    return ("sagittal", "coronal", "axial")[axis]


def parse_dataset_bytes(data: BinaryIO | bytes | memoryview, transfer_syntax: str,
                        max_bytes: int | None = None) -> Dataset:
    """Parse an encoded data set (no file meta, as carried in a C-STORE) without decoding pixels.

    `transfer_syntax` is the accepted presentation context's (PS3.5 10). Raises UnparsableDatasetError
    when the bytes are not a well-formed data set: any parser error, or an element that runs past the
    end of the received bytes (truncation), or bytes left over after the last element, or sequences
    nested deeper than MAX_NESTING. DatasetTooLargeError (0xA700) when the data set, or a Deflated one
    once inflated, is over `max_bytes`.
    """
    fp: BinaryIO = io.BytesIO(bytes(data)) if isinstance(data, bytes | memoryview) else data
    ts = UID(transfer_syntax)
    try:
        fp.seek(0, io.SEEK_END)
        size = fp.tell()
        fp.seek(0)
        if max_bytes is not None and size > max_bytes:
            raise DatasetTooLargeError(f"the data set is {size} bytes, over the limit of {max_bytes}")
        if ts == DeflatedExplicitVRLittleEndian:  # PS3.5 A.5: the whole data set is deflated
            fp = inflate(fp, max_bytes)
            size = len(fp.getbuffer())
        if size == 0:
            raise UnparsableDatasetError("the data set is empty")
        implicit = ts.is_implicit_VR if ts.is_transfer_syntax else True
        little = ts.is_little_endian if ts.is_transfer_syntax else True
        ds = pydicom.filereader.read_dataset(fp, implicit, little, defer_size=DEFER_SIZE)
        end = fp.tell()
    except (UnparsableDatasetError, DatasetTooLargeError):
        raise
    except RecursionError as exc:  # pydicom reads nested sequences recursively
        raise UnparsableDatasetError("the data set's sequences are nested too deeply") from exc
    except Exception as exc:  # pydicom raises many kinds on garbage; all mean "cannot understand"
        raise UnparsableDatasetError(f"the data set cannot be parsed: {type(exc).__name__}: {exc}") from exc
    _check_nesting(ds)
    _check_complete(ds, end, size)
    return ds


def inflate(fp: BinaryIO, max_bytes: int | None) -> io.BytesIO:
    """Inflate a Deflated Explicit VR Little Endian data set (PS3.5 A.5, raw RFC 1951), bounded.

    Output is produced at most `INFLATE_CHUNK` at a time; past `max_bytes` it stops and raises
    DatasetTooLargeError, so a small stream that would inflate to gigabytes never does.
    """
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    out = io.BytesIO()
    budget = None if max_bytes is None else max_bytes + 1
    pending = fp.read(INFLATE_CHUNK)
    while pending:
        while pending:
            step = INFLATE_CHUNK if budget is None else min(INFLATE_CHUNK, budget - out.tell())
            out.write(inflater.decompress(pending, step))
            pending = inflater.unconsumed_tail
            if max_bytes is not None and out.tell() > max_bytes:
                raise DatasetTooLargeError(f"the Deflated data set inflates beyond the limit of {max_bytes} bytes")
        if inflater.eof:
            break
        pending = fp.read(INFLATE_CHUNK)
    out.write(inflater.flush())
    if max_bytes is not None and out.tell() > max_bytes:
        raise DatasetTooLargeError(f"the Deflated data set inflates beyond the limit of {max_bytes} bytes")
    if not inflater.eof:
        raise UnparsableDatasetError("the Deflated data set is truncated (no end of the deflate stream)")
    out.seek(0)
    return out


def _check_nesting(ds: Dataset) -> None:
    """Refuse sequences nested deeper than MAX_NESTING (walked without recursion)."""
    stack: list[tuple[Dataset, int]] = [(ds, 0)]
    while stack:
        current, depth = stack.pop()
        for tag in current.keys():  # noqa: SIM118 - tags, not (converted) elements
            elem = current.get_item(tag, keep_deferred=True)
            if getattr(elem, "VR", None) != "SQ" or not isinstance(elem.value, Sequence):
                continue
            if depth + 1 > MAX_NESTING:
                raise UnparsableDatasetError(f"the data set's sequences are nested deeper than {MAX_NESTING}")
            stack.extend((item, depth + 1) for item in elem.value if isinstance(item, Dataset))


def _check_complete(ds: Dataset, end: int, size: int) -> None:
    """The last element must end exactly at the end of the received bytes (truncation / trailing junk)."""
    last_tell, last_len = -1, 0
    for tag in ds.keys():  # noqa: SIM118 - tags, not (converted) elements
        elem = ds.get_item(tag, keep_deferred=True)
        tell = getattr(elem, "value_tell", None)
        if tell is None:
            tell = getattr(elem, "file_tell", None)
        length = getattr(elem, "length", _UNDEFINED)
        if tell is not None and tell > last_tell:
            last_tell, last_len = tell, length
    if last_tell < 0:
        raise UnparsableDatasetError("the data set holds no elements")
    last_end = end if last_len == _UNDEFINED or last_len is None else last_tell + last_len
    if last_end != size:
        what = "truncated" if last_end > size else "not fully parsed (malformed or truncated)"
        raise UnparsableDatasetError(f"the data set is {what}: parsed to byte {last_end} of {size}")


def read_header_file(path: Path) -> Dataset:
    """Read a Part 10 file's header (file meta + data set up to the pixel data, PS3.10 7.1)."""
    try:
        return pydicom.dcmread(path, stop_before_pixels=True, defer_size=DEFER_SIZE)
    except Exception as exc:
        raise UnparsableDatasetError(f"{path.name} is not a readable DICOM file: {exc}") from exc


def _get(ds: Dataset, keyword: str) -> Any:
    try:
        value = ds.get(keyword)
    except Exception:  # a malformed value (e.g. a DS that is not a number) is treated as absent
        return None
    if value is None or value == "":
        return None
    return value


def _str(ds: Dataset, keyword: str) -> str | None:
    value = _get(ds, keyword)
    return None if value is None else str(value).strip() or None


def _int(ds: Dataset, keyword: str) -> int | None:
    value = _get(ds, keyword)
    try:
        return None if value is None else int(value)
    except (TypeError, ValueError):
        return None


def _float(ds: Dataset, keyword: str) -> float | None:
    value = _get(ds, keyword)
    try:
        f = None if value is None else float(value)
    except (TypeError, ValueError):
        return None
    return f if f is not None and math.isfinite(f) else None


def _shared(ds: Dataset, sequence: str) -> Dataset:
    """The first item of a Shared Functional Groups macro (enhanced multi-frame, PS3.3 C.7.6.16)."""
    try:
        return getattr(ds.SharedFunctionalGroupsSequence[0], sequence)[0]
    except Exception:
        return Dataset()


def _uid(ds: Dataset, keyword: str) -> str | None:
    """A UID as sent, only its NUL (or space) padding removed (PS3.5 9.1), so a malformed one (a newline,
    a slash) stays visible to the UID check instead of being tidied up by pydicom's conversion."""
    tag = pydicom.datadict.tag_for_keyword(keyword)
    try:
        elem = ds.get_item(tag) if tag is not None and tag in ds else None
    except Exception:
        return None
    value = None if elem is None else elem.value
    if isinstance(value, bytes):
        value = value.decode("ascii", errors="backslashreplace")
    if value is None or isinstance(value, list | tuple) and not value:
        return None
    return str(value).rstrip("\0 ") or None


def identifiers(ds: Dataset) -> tuple[str, str, str]:
    """(Study, Series, SOP Instance UID); MissingIdentifierError (0xC211) when one is absent.

    The values are returned as sent (padding removed): the spool's UID check refuses malformed ones.
    """
    uids = tuple(_uid(ds, k) for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"))
    missing = [k for k, v in zip(("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"), uids, strict=True)
               if not v]
    if missing:
        raise MissingIdentifierError(f"the data set has no {', '.join(missing)}")
    return uids  # type: ignore[return-value]


def instance_record(ds: Dataset, *, path: Path | str, size: int, transfer_syntax: str | None,
                    calling_ae: str | None, association_id: int | None,
                    sop_class_uid: str | None = None, content_sha256: str | None = None) -> InstanceRecord:
    """The job store's row for one stored instance, from its header (no pixel data, no patient data).

    `content_sha256` is the hash of the data set bytes as received (duplicates are told apart by it).
    """
    study, series, sop = identifiers(ds)
    sop_class = _str(ds, "SOPClassUID") or sop_class_uid
    if not sop_class:
        raise MissingIdentifierError("the data set has no SOPClassUID")
    return InstanceRecord(
        sop_instance_uid=sop, sop_class_uid=sop_class, study_uid=study, series_uid=series,
        transfer_syntax=transfer_syntax, path=str(path), size=size, calling_ae=calling_ae,
        association_id=association_id, content_sha256=content_sha256,
        modality=_str(ds, "Modality"),
        body_part=_str(ds, "BodyPartExamined"),
        series_description=_str(ds, "SeriesDescription"),
        series_number=_int(ds, "SeriesNumber"),
        slice_thickness=_float(ds, "SliceThickness") or _float(_shared(ds, "PixelMeasuresSequence"), "SliceThickness"),
        orientation=classify_orientation(_get(ds, "ImageOrientationPatient")
                                         or _get(_shared(ds, "PlaneOrientationSequence"), "ImageOrientationPatient")),
        instance_number=_int(ds, "InstanceNumber"),
        rows=_int(ds, "Rows"),
        columns=_int(ds, "Columns"),
        images_in_acquisition=_int(ds, "ImagesInAcquisition"),
        slice_position=slice_position(_get(ds, "ImageOrientationPatient"), _get(ds, "ImagePositionPatient")),
    )


def slice_position(iop: Sequence[Any] | None, ipp: Sequence[Any] | None) -> float | None:
    """Image Position (Patient) projected on the slice normal, mm (PS3.3 C.7.6.2.1.1); None if unusable."""
    n, p = slice_normal(iop), _finite(ipp, 3)
    if n is None or p is None:
        return None
    return sum(a * b for a, b in zip(n, p, strict=True))
