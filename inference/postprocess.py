"""Network outputs -> findings in patient mm plus a label map on the source grid (docs/design.md, Model contract).

Label map convention: the value of a voxel is the `LabelSpec.index` of its class (0 = background), so
one SEG segment per label class (PS3.3 C.8.20.2). Findings of one class share that value (every nodule
has label_index 1); each Finding keeps its own identity (centre, size, tracking UID).

Measurements are taken on the SOURCE grid: volume = voxel count x source voxel volume, diameter = that
of the sphere of equal volume, centre = centroid of the component mapped through the Volume affine.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
from pydicom.uid import generate_uid
from scipy import ndimage

from inference.errors import InferenceError
from inference.findings import Code, Finding
from inference.model_card import CodeModel, LabelSpec, ModelCard
from inference.preprocess import ResampleInfo, to_source_grid
from inference.volume import Volume

_CONNECTIVITY = ndimage.generate_binary_structure(3, 3)  # 26-neighbourhood: diagonal contacts join


class PostprocessError(InferenceError):
    """Network output cannot be turned into findings (wrong shape, unknown task...)."""

    stage = "postprocess"


def code_of(c: CodeModel | None) -> Code | None:
    """A model-card code as a finding code (None stays None)."""
    return None if c is None else Code(value=c.value, scheme=c.scheme, meaning=c.meaning)


def _map_dtype(max_label: int) -> type[np.integer]:
    return np.uint8 if max_label <= np.iinfo(np.uint8).max else np.uint16


def sigmoid(x: np.ndarray) -> np.ndarray:
    """Numerically stable logistic function, float32."""
    x = np.asarray(x, dtype=np.float32)
    return (0.5 * (1.0 + np.tanh(0.5 * x))).astype(np.float32, copy=False)


def softmax(x: np.ndarray, axis: int = 0) -> np.ndarray:
    """Softmax along `axis` (channels), float32."""
    e = np.exp(np.asarray(x, dtype=np.float32) - np.max(x, axis=axis, keepdims=True))
    e /= e.sum(axis=axis, keepdims=True)
    return e


def sphere_diameter_mm(volume_mm3: np.ndarray | float) -> np.ndarray:
    """Diameter (mm) of the sphere of that volume: how a finding's size is reported."""
    return (6.0 * np.asarray(volume_mm3, dtype=np.float64) / math.pi) ** (1.0 / 3.0)


def _finding(volume: Volume, spec: LabelSpec, centre_zyx: np.ndarray, probability: float, count: int,
             with_diameter: bool) -> Finding:
    volume_mm3 = float(count) * volume.voxel_volume_mm3
    z = int(np.clip(round(float(centre_zyx[0])), 0, len(volume.sop_instance_uids) - 1))
    return Finding(
        label_index=spec.index,
        label=spec.name,
        finding_code=code_of(spec.finding),  # type: ignore[arg-type]
        centre_mm=tuple(float(v) for v in volume.index_to_patient(centre_zyx)),  # type: ignore[arg-type]
        probability=float(probability),
        diameter_mm=float(sphere_diameter_mm(volume_mm3)) if with_diameter else None,
        volume_mm3=volume_mm3,
        site_code=code_of(spec.site),
        referenced_sop_instance_uid=volume.sop_instance_uids[z],
        tracking_uid=generate_uid(),
    )


def source_components(prob: np.ndarray, info: ResampleInfo, source_shape: Sequence[int], threshold: float
                      ) -> Iterator[tuple[tuple[slice, slice, slice], np.ndarray, np.ndarray]]:
    """Connected components of (model-grid `prob` mapped linearly to the source grid) > threshold.

    Yields (source box, component mask in the box, probabilities in the box), equal to labelling the
    whole interpolated map but without building it (a float map and an int32 label array of a 600-slice
    CT are ~8x its stored voxel bytes): a source voxel above the threshold interpolates at least one
    model voxel above it, so each component lies inside one component of the model-grid mask dilated by
    a voxel, and only that region's box is interpolated.
    """
    shape = tuple(int(n) for n in source_shape)
    scale = np.asarray(info.source_spacing, dtype=np.float64) / np.asarray(info.target_spacing, dtype=np.float64)
    seeds = ndimage.binary_dilation(prob > threshold, structure=_CONNECTIVITY)
    regions, _ = ndimage.label(seeds, structure=_CONNECTIVITY)
    for rid, box_m in enumerate(ndimage.find_objects(regions), start=1):
        if box_m is None:
            continue
        # source voxels whose model coordinate j * scale falls in the region's box (+1 voxel)
        lo = [max(0, int(np.floor((b.start - 1) / s))) for b, s in zip(box_m, scale, strict=True)]
        hi = [min(n_, int(np.ceil(b.stop / s)) + 1) for b, s, n_ in zip(box_m, scale, shape, strict=True)]
        box = tuple(slice(a_, b_) for a_, b_ in zip(lo, hi, strict=True))
        out_shape = tuple(b_ - a_ for a_, b_ in zip(lo, hi, strict=True))
        offset = np.asarray(lo, dtype=np.float64) * scale
        local = np.empty(out_shape, dtype=np.float32)
        ndimage.affine_transform(prob, scale, offset=offset, output_shape=out_shape, output=local, order=1,
                                 mode="nearest")
        owner = np.empty(out_shape, dtype=regions.dtype)
        ndimage.affine_transform(regions, scale, offset=offset, output_shape=out_shape, output=owner, order=0,
                                 mode="nearest")
        comps, k = ndimage.label((local > threshold) & (owner == rid), structure=_CONNECTIVITY)
        for cid in range(1, k + 1):
            yield box, comps == cid, local  # type: ignore[misc]


def nodules(prob: np.ndarray, volume: Volume, card: ModelCard,
            info: ResampleInfo | None = None) -> tuple[list[Finding], np.ndarray]:
    """Sigmoid probabilities [Z, Y, X] (or [1, Z, Y, X]) -> one Finding per connected component.

    With `info` the map is on the model grid; components are those of its linear interpolation onto the
    source grid (`source_components`); without it, it must already be on the source grid. Components whose
    voxels exceed thresholds.probability and pass min_diameter_mm / min_volume_mm3 / min_mean_hu and
    max_mean_hu (mean source HU of the component) become findings, sorted by max probability (descending).
    """
    prob = prob[0] if prob.ndim == 4 and prob.shape[0] == 1 else prob
    spec = card.labels[0]
    th = card.thresholds
    label_map = np.zeros(volume.shape, dtype=_map_dtype(spec.index))
    if info is not None:
        if prob.shape != info.model_shape:
            raise PostprocessError(f"probability map {prob.shape} is not on the model grid {info.model_shape}")
        parts = source_components(prob, info, volume.shape, th.probability)
    else:
        if prob.shape != volume.shape:
            raise PostprocessError(f"probability map {prob.shape} is not on the source grid {volume.shape}")
        parts = source_components(prob, ResampleInfo.of(volume, volume.spacing, volume.shape), volume.shape,
                                  th.probability)
    found: list[Finding] = []
    for box, mask, local in parts:
        idx = np.argwhere(mask)
        centre = idx.mean(axis=0) + np.array([b.start for b in box], dtype=np.float64)
        f = _finding(volume, spec, centre, float(local[mask].max()), len(idx), with_diameter=True)
        if f.diameter_mm < th.min_diameter_mm or f.volume_mm3 < th.min_volume_mm3:  # type: ignore[operator]
            continue
        if th.min_mean_hu is not None or th.max_mean_hu is not None:
            mean_hu = float(volume.voxels[box][mask].mean())
            if mean_hu < (th.min_mean_hu if th.min_mean_hu is not None else -np.inf) or \
                    mean_hu > (th.max_mean_hu if th.max_mean_hu is not None else np.inf):
                continue
        label_map[box][mask] = spec.index
        found.append(f)
    found.sort(key=lambda f: -f.probability)
    return found, label_map


def _largest_component(mask: np.ndarray) -> np.ndarray | None:
    components, n = ndimage.label(mask, structure=_CONNECTIVITY)
    if n == 0:
        return None
    counts = np.bincount(components.ravel(), minlength=n + 1)
    counts[0] = 0
    return components == int(np.argmax(counts))


def cranio_caudal_subset(labels: Sequence[int], weights: Sequence[float]) -> list[int]:
    """Positions of the heaviest run of instances whose labels strictly increase, cranial to caudal.

    `labels[j]` is the level index (1 = most cranial level) of instance j, instances sorted cranial first;
    `weights[j]` its evidence (probability mass). Levels in one field of view keep their anatomical order,
    so an instance that contradicts the order of the heavier rest (e.g. an iliac crest called "C7" below
    L4) is dropped. Weighted longest increasing subsequence, O(n^2) for n <= 25 instances.
    """
    n = len(labels)
    if len(weights) != n:
        raise PostprocessError(f"{n} labels but {len(weights)} weights")
    best = [float(w) for w in weights]
    prev = [-1] * n
    for j in range(n):
        for i in range(j):
            if labels[i] < labels[j] and best[i] + weights[j] > best[j]:
                best[j], prev[j] = best[i] + float(weights[j]), i
    keep: list[int] = []
    j = int(np.argmax(best)) if n else -1
    while j >= 0:
        keep.append(j)
        j = prev[j]
    return keep[::-1]


def vertebrae(probs: np.ndarray, volume: Volume, card: ModelCard,
              info: ResampleInfo | None = None) -> tuple[list[Finding], np.ndarray]:
    """Softmax probabilities [C, Z, Y, X] (channel 0 background, channel k = LabelSpec.index k).

    Argmax, then the largest connected component per label (on the grid the probabilities are on); its
    mean softmax probability must reach thresholds.probability. With `card.ordered_levels` instances out of
    cranio-caudal order are dropped (`cranio_caudal_subset`). The cleaned label map is mapped back to the
    source grid (nearest neighbour); centroid and volume are measured there.
    """
    if probs.ndim != 4:
        raise PostprocessError(f"expected softmax probabilities [C, Z, Y, X], got shape {probs.shape}")
    specs = [s for s in card.labels if s.index < probs.shape[0]]
    if len(specs) != len(card.labels):
        raise PostprocessError(f"{probs.shape[0]} channels cannot hold labels up to "
                               f"{max(s.index for s in card.labels)}")
    dtype = _map_dtype(max(s.index for s in specs))
    argmax = probs.argmax(axis=0)
    instances: list[tuple[int, np.ndarray]] = []
    for spec in specs:
        comp = _largest_component(argmax == spec.index)
        if comp is not None and float(probs[spec.index][comp].mean()) >= card.thresholds.probability:
            instances.append((spec.index, comp))
    if card.ordered_levels and len(instances) > 1:
        if [s.index for s in specs] != list(range(1, len(specs) + 1)):
            raise PostprocessError("ordered_levels needs labels indexed 1..N in cranio-caudal order")
        # cranio-caudal order by patient z (superior = +z in LPS) of each instance's centre
        scale = (np.asarray(info.target_spacing) / np.asarray(info.source_spacing)) if info is not None else 1.0
        centres = np.array([np.argwhere(comp).mean(axis=0) * scale for _, comp in instances])
        order = np.argsort(-volume.index_to_patient(centres)[:, 2], kind="stable")
        instances = [instances[i] for i in order]
        keep = cranio_caudal_subset([k for k, _ in instances],
                                    [float(probs[k][comp].sum()) for k, comp in instances])
        instances = [instances[i] for i in keep]
    labels = [k for k, _ in instances]
    cleaned = np.zeros(argmax.shape, dtype=dtype)
    mean_prob: dict[int, float] = {}
    for k, (_, comp) in zip(labels, instances, strict=True):
        cleaned[comp] = k
        mean_prob[k] = float(probs[k][comp].mean())
    label_map = to_source_grid(cleaned, info, volume.shape, order=0) if info is not None else cleaned
    if label_map.shape != volume.shape:
        raise PostprocessError(f"label map {label_map.shape} is not on the source grid {volume.shape}")
    kept = sorted(mean_prob)
    if not kept:
        return [], label_map
    counts = np.bincount(label_map.ravel(), minlength=max(kept) + 1)
    centres = ndimage.center_of_mass(np.ones_like(label_map, dtype=np.uint8), label_map, kept)
    by_index = {s.index: s for s in specs}
    found: list[Finding] = []
    for k, centre in zip(kept, centres, strict=True):
        count = int(counts[k])
        if count == 0 or count * volume.voxel_volume_mm3 < card.thresholds.min_volume_mm3:
            label_map[label_map == k] = 0
            continue
        found.append(_finding(volume, by_index[k], np.asarray(centre), mean_prob[k], count, with_diameter=False))
    return found, label_map


def postprocess(logits: np.ndarray, volume: Volume, card: ModelCard,
                info: ResampleInfo | None = None) -> tuple[list[Finding], np.ndarray]:
    """Logits [C, Z, Y, X] -> (findings, source-grid label map), by card.output.activation and card.postprocess."""
    if logits.ndim != 4 or logits.shape[0] != card.output.channels:
        raise PostprocessError(f"logits shape {logits.shape}; expected [{card.output.channels}, Z, Y, X]")
    probs = sigmoid(logits) if card.output.activation == "sigmoid" else softmax(logits, axis=0)
    if card.postprocess == "nodules":
        return nodules(probs, volume, card, info)
    if card.postprocess == "vertebrae":
        return vertebrae(probs, volume, card, info)
    raise PostprocessError(f"unknown postprocess {card.postprocess!r}")
