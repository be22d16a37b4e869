"""Synthetic studies -> NIfTI volumes + a MONAI datalist JSON (datasets/<name>/generated/, gitignored).

Each case is written as `<case>_image.nii` (int16 HU) and `<case>_label.nii` (uint8) with the array in
the source axis order [Z, Y, X] and a diagonal affine diag(sz, sy, sx), so MONAI's `Spacingd` sees the
(z, y, x) spacing the inference side resamples from. Ground truth (nodule centres and diameters, vertebra
centroids, all in mm as given by `training.synthetic`) is kept in the datalist entry for evaluation.
"""

from __future__ import annotations

import json
import multiprocessing
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from tqdm import tqdm

from inference.volume import Volume
from training.synthetic.chest_ct import generate_chest_ct
from training.synthetic.spine_ct import MIN_VISIBLE_FRACTION, generate_spine_ct

DATALIST = "datalist.json"


@dataclass
class Case:
    """The part of `training.synthetic.SyntheticVolume` the pipeline uses (also made by `phantom_case`)."""

    hu: np.ndarray                      # int16 [Z, Y, X]
    label_map: np.ndarray               # uint8 [Z, Y, X]
    spacing: tuple[float, float, float]  # (z, y, x) mm
    origin: tuple[float, ...]
    truth: dict[str, Any] = field(default_factory=dict)


def _synthetic_case(task: str, seed: int, rows: int, slices: int | None, spacing: Sequence[float] | None) -> Case:
    kwargs: dict[str, Any] = {"slices": slices, "rows": rows, "spacing": tuple(spacing) if spacing else None}
    if task == "lung-nodule":
        vol = generate_chest_ct(seed, **kwargs)
        truth = {"nodules": [
            {"centre_mm": [float(c) for c in n.centre_mm], "diameter_mm": float(n.diameter_mm),
             "kind": str(getattr(n, "kind", "")), "juxtapleural": bool(getattr(n, "juxtapleural", False))}
            for n in vol.nodules
        ]}
    else:
        vol = generate_spine_ct(seed, **kwargs)
        truth = {"vertebrae": [
            {"label": str(v.label), "index": int(v.index), "centroid_mm": [float(c) for c in v.centroid_mm]}
            for v in vol.vertebrae
        ]}
    return Case(
        hu=np.asarray(vol.hu, dtype=np.int16), label_map=np.asarray(vol.label_map, dtype=np.uint8),
        spacing=tuple(float(s) for s in vol.spacing), origin=tuple(float(o) for o in vol.origin), truth=truth,
    )


def phantom_case(task: str, seed: int, shape: Sequence[int] = (24, 48, 48),
                 spacing: Sequence[float] = (2.5, 2.0, 2.0)) -> Case:
    """A tiny phantom (body ellipse, lungs, spheres / stacked blocks) for unit tests and the smoke model.

    Used only where `training.synthetic` is not wanted (fast tests); never for shipped models.
    """
    rng = np.random.default_rng(seed)
    z, y, x = (np.arange(n, dtype=np.float32) for n in shape)
    zz, yy, xx = np.meshgrid(z, y, x, indexing="ij")
    cy, cx = shape[1] / 2, shape[2] / 2
    hu = np.full(shape, -1000.0, dtype=np.float32)
    body = ((yy - cy) / (0.45 * shape[1])) ** 2 + ((xx - cx) / (0.48 * shape[2])) ** 2 <= 1
    hu[body] = 40.0
    label = np.zeros(shape, dtype=np.uint8)
    truth: dict[str, Any] = {}
    if task == "lung-nodule":
        for side in (-1, 1):
            lung = ((yy - cy) / (0.3 * shape[1])) ** 2 + ((xx - cx - side * 0.22 * shape[2]) / (0.17 * shape[2])) ** 2
            hu[lung <= 1] = -850.0
        nodules = []
        for _ in range(2):
            c = (rng.uniform(0.3, 0.7) * shape[0], rng.uniform(0.35, 0.65) * shape[1],
                 cx + rng.choice([-1, 1]) * 0.22 * shape[2])
            r = rng.uniform(2.0, 3.5)
            ball = (zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2 <= r**2
            hu[ball] = 20.0
            label[ball] = 1
            nodules.append({"centre_mm": [c[2] * spacing[2], c[1] * spacing[1], c[0] * spacing[0]],
                            "diameter_mm": 2 * r * spacing[1], "kind": "solid", "juxtapleural": False})
        truth["nodules"] = nodules
    else:
        first = int(rng.integers(1, 20))
        height = max(2, shape[0] // 6)
        vertebrae = []
        for k in range(shape[0] // height):
            value = first + k if first + k <= 24 else 26
            block = (zz >= k * height) & (zz < (k + 1) * height - 1) & ((yy - cy - 6) ** 2 + (xx - cx) ** 2 <= 16)
            hu[block] = 300.0 + 10 * k
            label[block] = value
            vertebrae.append({"label": str(value), "index": value,
                              "centroid_mm": [cx * spacing[2], (cy + 6) * spacing[1], (k + 0.5) * height * spacing[0]]})
        truth["vertebrae"] = vertebrae
    hu += rng.normal(0, 15, size=shape).astype(np.float32)
    return Case(hu=np.clip(hu, -1024, 3000).astype(np.int16), label_map=label,
                spacing=tuple(float(s) for s in spacing), origin=(0.0, 0.0, 0.0), truth=truth)


def write_nifti(path: Path, array: np.ndarray, spacing: Sequence[float]) -> None:
    """Write [Z, Y, X] with affine diag(sz, sy, sx) (axes are kept; see module docstring)."""
    affine = np.diag([float(spacing[0]), float(spacing[1]), float(spacing[2]), 1.0])
    nib.save(nib.Nifti1Image(np.ascontiguousarray(array), affine), str(path))


def write_case(out_dir: Path, name: str, case: Case, seed: int) -> dict[str, Any]:
    """Write one case and return its datalist entry (paths relative to out_dir)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_nifti(out_dir / f"{name}_image.nii", case.hu, case.spacing)
    write_nifti(out_dir / f"{name}_label.nii", case.label_map, case.spacing)
    return {"image": f"{name}_image.nii", "label": f"{name}_label.nii", "seed": seed,
            "spacing": list(case.spacing), "origin": list(case.origin), "shape": list(case.hu.shape), **case.truth}


def _generate_case(task: str, out_dir: Path, section: str, rows: int, slices: int | None,
                   spacing: Sequence[float] | None, phantom: bool, seed: int) -> dict[str, Any]:
    case = phantom_case(task, seed) if phantom else _synthetic_case(task, seed, rows, slices, spacing)
    return write_case(out_dir, f"{section}_{seed:06d}", case, seed)


def generate_dataset(
    task: str, out_dir: Path, section: str, n: int, seed: int, rows: int = 512,
    slices: int | None = None, spacing: Sequence[float] | None = None, phantom: bool = False,
    progress: bool = True, workers: int = 1,
) -> list[dict[str, Any]]:
    """Generate `n` cases with seeds seed..seed+n-1 into `out_dir` as datalist section `section`, `workers` at a
    time (processes).

    Reuses the section when datalist.json already records the same parameters (the data are
    deterministic in the seed). Returns the entries with absolute paths.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / DATALIST
    datalist: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
    params = {"task": task, "n": n, "seed": seed, "rows": rows, "slices": slices,
              "spacing": list(spacing) if spacing else None, "phantom": phantom}
    if task == "spine-vertebrae" and not phantom:   # the annotation rule is part of what was generated
        params["min_visible_fraction"] = MIN_VISIBLE_FRACTION
    meta = datalist.setdefault("generation", {})
    reuse = meta.get(section) == params and all(
        (out_dir / e["image"]).is_file() and (out_dir / e["label"]).is_file() for e in datalist.get(section, [])
    )
    if not reuse:
        job = partial(_generate_case, task, out_dir, section, rows, slices, spacing, phantom)
        seeds = range(seed, seed + n)
        parallel = workers > 1 and n > 1 and not phantom   # a case depends on its seed only: the same files
        with (ProcessPoolExecutor(min(workers, n), mp_context=multiprocessing.get_context("spawn")) if parallel
              else nullcontext()) as pool:
            done = pool.map(job, seeds) if pool is not None else map(job, seeds)
            if progress:
                done = tqdm(done, total=n, desc=f"generate {section}", unit="case")
            entries = list(done)
        datalist[section] = entries
        meta[section] = params
        datalist["generator"] = "training.datasets.phantom_case" if phantom else "training.synthetic"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(datalist, indent=1))
        tmp.replace(path)
    return [resolve(e, out_dir) for e in datalist[section]]


def entry_volume(entry: dict[str, Any]) -> Any:
    """A generated case (NIfTI image + the entry's spacing and origin) as the gateway's `inference.volume.Volume`
    (axial, identity direction; stand-in SOP Instance UIDs)."""
    hu = np.asarray(nib.load(entry["image"]).dataobj, dtype=np.float32)
    return Volume(voxels=hu, spacing=tuple(entry["spacing"]), origin=np.asarray(entry["origin"], dtype=float),
                  direction=np.eye(3), sop_instance_uids=[f"2.25.{i + 1}" for i in range(hu.shape[0])],
                  modality="CT", frame_of_reference_uid="2.25.1")


def resolve(entry: dict[str, Any], base: Path) -> dict[str, Any]:
    """Datalist entry with image/label made absolute against `base`."""
    return {**entry, "image": str(base / entry["image"]), "label": str(base / entry["label"])}
