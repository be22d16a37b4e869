"""MONAI datalist JSON (Decathlon style) plus SHA256SUMS for loaded real-format cases.

A datalist has the keys "training", "validation" and "test"; each entry has "image" (and "label" where a
mask exists) as paths relative to the datalist's folder, which is what `monai.data.load_decathlon_datalist`
resolves, plus the annotation fields the evaluation needs:

- LUNA16: "seriesuid", "nodules": [[x, y, z, diameter_mm], ...], "excluded": [...] (world LPS mm);
- VerSe: "subject", "centroids": [[label, x, y, z], ...] (patient LPS mm), "label" = vertebra mask;
- Tianchi: "study_uid", "series_uid", "instance_uid", "series": folder, "keypoints": [...].

A plain dict with an "image" key is written as given. `SHA256SUMS` (sha256sum format, paths relative to
the datalist folder) covers every referenced file, so `sha256sum -c SHA256SUMS` checks the data.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from training.errors import LoaderError
from training.loaders.luna16 import Case
from training.loaders.tianchi import KeypointCase
from training.loaders.verse import SpineCase

SPLITS = ("training", "validation", "test")
SUMS_NAME = "SHA256SUMS"


def case_id(case: Any) -> str:
    """A stable identifier: seriesuid, subject, study UID, or a dict's "id"/"image"."""
    if isinstance(case, Case):
        return case.series_uid
    if isinstance(case, SpineCase):
        return case.subject
    if isinstance(case, KeypointCase):
        return case.study_uid
    if isinstance(case, Mapping):
        return str(case.get("id", case.get("image")))
    raise TypeError(f"cannot make a datalist entry from {type(case).__name__}")


def _rel(path: Path, base: Path) -> str:
    path = Path(path).resolve()
    try:
        return path.relative_to(base).as_posix()
    except ValueError:
        return str(path)


def _companions(path: Path) -> list[Path]:
    """A MetaImage header's data file(s) (same stem: .raw / .zraw), or the path itself."""
    if path.suffix.lower() == ".mhd":
        return [path, *sorted(p for p in path.parent.glob(path.stem + ".*") if p.suffix.lower() != ".mhd")]
    return [path]


def case_to_entry(case: Any, base: Path) -> tuple[dict[str, Any], list[Path]]:
    """(datalist entry, files it references) for one loaded case."""
    base = Path(base).resolve()
    if isinstance(case, Case):
        entry: dict[str, Any] = {
            "image": _rel(case.image_path, base), "seriesuid": case.series_uid,
            "nodules": [[*n.centre_mm, n.diameter_mm] for n in case.nodules],
            "excluded": [[*n.centre_mm, n.diameter_mm] for n in case.excluded],
            "spacing": list(case.spacing), "origin": list(case.origin), "direction": list(case.direction),
        }
        return entry, _companions(case.image_path)
    if isinstance(case, SpineCase):
        entry = {"image": _rel(case.image_path, base), "subject": case.subject,
                 "centroids": [[c.label, *c.centre_mm] for c in case.centroids],
                 "centroid_names": [c.name for c in case.centroids]}
        files = [case.image_path, case.centroids_path]
        if case.mask_path is not None:
            entry["label"] = _rel(case.mask_path, base)
            files.append(case.mask_path)
        return entry, files
    if isinstance(case, KeypointCase):
        entry = {"image": _rel(case.image_path, base), "study_uid": case.study_uid,
                 "series_uid": case.series_uid, "instance_uid": case.instance_uid,
                 "series": _rel(case.image_path.parent, base),
                 "pixel_spacing": list(case.pixel_spacing) if case.pixel_spacing else None,
                 "keypoints": [{"tag": k.tag, "kind": k.kind, "classes": list(k.classes), "xy_px": list(k.xy_px),
                                "centre_mm": list(k.centre_mm) if k.centre_mm else None, "z_index": k.z_index}
                               for k in case.keypoints]}
        return entry, [case.image_path, *case.series_paths]
    if isinstance(case, Mapping):
        if "image" not in case:
            raise LoaderError(f"datalist entry without 'image': {dict(case)}")
        entry = dict(case)
        files = []
        for key in ("image", "label"):
            if key in entry:
                p = Path(entry[key])
                p = p if p.is_absolute() else base / p
                files.extend(sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p])
        return entry, files
    raise TypeError(f"cannot make a datalist entry from {type(case).__name__}")


def split_ids(ids: Sequence[str], val_fraction: float, test_fraction: float, seed: int) -> dict[str, list[str]]:
    """Deterministic shuffle (seeded) of the sorted ids into training / validation / test."""
    if not 0 <= val_fraction + test_fraction <= 1:
        raise ValueError("val_fraction + test_fraction must lie in [0, 1]")
    order = sorted(ids)
    random.Random(seed).shuffle(order)
    n_test = round(len(order) * test_fraction)
    n_val = round(len(order) * val_fraction)
    return {"test": order[:n_test], "validation": order[n_test:n_test + n_val],
            "training": order[n_test + n_val:]}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _read_sums(path: Path) -> dict[str, str]:
    sums: dict[str, str] = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            digest, _, name = line.partition("  ")
            if digest and name:
                sums[name] = digest
    return sums


def write_sha256sums(files: Iterable[Path], base: Path) -> Path:
    """Add/refresh `base/SHA256SUMS` lines for `files` (other lines are kept)."""
    base = Path(base).resolve()
    out = base / SUMS_NAME
    sums = _read_sums(out)
    for f in files:
        if not Path(f).is_file():
            raise LoaderError(f"datalist references a missing file: {f}")
        sums[_rel(f, base)] = sha256_file(Path(f))
    tmp = out.with_suffix(".tmp")
    tmp.write_text("".join(f"{d}  {n}\n" for n, d in sorted(sums.items())), encoding="utf-8")
    tmp.replace(out)
    return out


def verify_sha256sums(base: Path) -> list[str]:
    """Names of files under `base` whose content differs from (or is missing for) SHA256SUMS."""
    base = Path(base)
    bad = []
    for name, digest in _read_sums(base / SUMS_NAME).items():
        p = Path(name) if Path(name).is_absolute() else base / name
        if not p.is_file() or sha256_file(p) != digest:
            bad.append(name)
    return bad


def write_datalist(cases: Sequence[Any], out: Path, name: str, *, splits: Mapping[str, Sequence[str]] | None = None,
                   val_fraction: float = 0.2, test_fraction: float = 0.0, seed: int = 0,
                   description: str = "", provenance: Mapping[str, Any] | None = None) -> Path:
    """Write a MONAI datalist for `cases` at `out` and refresh SHA256SUMS next to it.

    `splits` maps "training"/"validation"/"test" to case ids (see `case_id`); ids not listed go to
    training. Without it the cases are split by a seeded shuffle (`val_fraction`, `test_fraction`).
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    base = out.parent.resolve()
    entries: dict[str, dict[str, Any]] = {}
    files: list[Path] = []
    for case in cases:
        cid = case_id(case)
        if cid in entries:
            raise LoaderError(f"duplicate case id {cid!r} in datalist {name!r}")
        entry, refs = case_to_entry(case, base)
        entries[cid] = entry
        files.extend(refs)
    if splits is None:
        assignment = split_ids(list(entries), val_fraction, test_fraction, seed)
    else:
        unknown = {k for k in splits if k not in SPLITS} | ({i for ids in splits.values() for i in ids} - set(entries))
        if unknown:
            raise LoaderError(f"splits name unknown keys or case ids: {sorted(unknown)}")
        listed = {i for ids in splits.values() for i in ids}
        assignment = {k: list(splits.get(k, ())) for k in SPLITS}
        assignment["training"] += sorted(set(entries) - listed)
    doc: dict[str, Any] = {"name": name, "description": description, "provenance": dict(provenance or {})}
    for key in SPLITS:
        doc[key] = [entries[i] for i in assignment.get(key, [])]
    doc["numTraining"] = len(doc["training"])
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    tmp.replace(out)
    write_sha256sums(files, base)
    return out


def read_datalist(path: Path, split: str = "training") -> list[dict[str, Any]]:
    """Entries of one split with "image"/"label" made absolute (monai.data.load_decathlon_datalist)."""
    from monai.data import load_decathlon_datalist

    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise LoaderError(f"{path}: cannot read datalist ({exc})") from exc
    if split not in doc:
        raise LoaderError(f"{path}: no {split!r} list (has {sorted(k for k in doc if k in SPLITS)})")
    if not doc[split]:
        return []
    return load_decathlon_datalist(str(path), is_segmentation=True, data_list_key=split)
