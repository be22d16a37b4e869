"""Candidate classification, a later stage of lung nodule detection: blobs scored by a classifier, added to the
findings of the stages before it.

The first stage (a segmentation network, `inference.postprocess.nodules`) finds every 10-30 mm nodule but misses
small ones against a vessel or the pleura. The classifier (card `postprocess: candidates`, named as a
`candidate_classification` stage in the card of the model it completes, `inference.composition`) scores each
`inference.candidates` blob on a 24 mm patch at 1 mm; blobs at or above its threshold that no earlier finding
already covers become findings of their own, with the diameter of the blob's best LoG scale and a sphere of that
size in the label map.

Test-time flips (`card.input.flips`, as for the first stage, `inference.model_pass`): each candidate whose plain
score is at least `card.input.flip_screen` is scored again on its patch mirrored along each listed axis, and its
probability is the mean of the plain and mirrored passes. With flips along z, y and x and a screen of 0.5,
40-50 candidates per CT (of ~3000) pass, about 140 more patches, and any threshold at or above
(0.5 + 3) / 4 = 0.875 keeps exactly the candidates that flipping every patch would.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import numpy as np
from pydicom.uid import generate_uid

from inference.backends.base import Backend
from inference.candidates import ISO_MM, WINDOW, chest_candidates, patches, to_iso, to_u8
from inference.errors import InferenceError
from inference.findings import Algorithm, Finding, algorithm_of
from inference.model_card import ModelCard
from inference.postprocess import code_of
from inference.volume import Volume

log = logging.getLogger(__name__)

SUPPRESS_MM = 4.0   # a blob within a kept finding's radius + this (first stage or blob) is the same nodule


class CandidateStageError(InferenceError):
    """The candidate classifier cannot score this volume."""

    stage = "postprocess"


@dataclass(frozen=True)
class ScoredCandidates:
    """Every blob candidate of one volume: source-grid indices (z, y, x) [N, 3], probabilities [N], diameters [N]."""

    source_index: np.ndarray
    probability: np.ndarray
    diameter_mm: np.ndarray


def score_candidates(volume: Volume, backend: Backend, card: ModelCard, threads: int = 1) -> ScoredCandidates:
    """Find the blob candidates of `volume` (the LoG on `threads` threads) and score each with the classifier
    behind `backend`."""
    if tuple(card.input.spacing_mm) != (ISO_MM,) * 3 or len(set(card.input.roi_size)) != 1:
        raise CandidateStageError(f"{card.name}: candidates are scored on cubic patches at {ISO_MM} mm, card has "
                               f"{card.input.spacing_mm} / {card.input.roi_size}")
    if tuple(card.input.window) != WINDOW:
        raise CandidateStageError(f"{card.name}: window {card.input.window} differs from the patches' {WINDOW} HU")
    iso = to_iso(volume.voxels, volume.spacing)
    found = chest_candidates(iso, threads)
    u8 = to_u8(iso)
    del iso
    scores = classify_patches(u8, found.index, backend, card)
    again = np.flatnonzero(scores >= card.input.flip_screen) if card.input.flips else np.zeros(0, dtype=int)
    if len(again):
        total = scores[again].copy()
        for axes in card.input.flips:
            total += classify_patches(u8, found.index[again], backend, card, axes)
        scores[again] = total / np.float32(1 + len(card.input.flips))
    source = found.index * (ISO_MM / np.asarray(volume.spacing, dtype=np.float64))
    return ScoredCandidates(source, scores, found.diameter_mm)


def classify_patches(u8: np.ndarray, index: np.ndarray, backend: Backend, card: ModelCard,
                     flip: tuple[int, ...] = ()) -> np.ndarray:
    """Classifier probabilities of the patches of the uint8 1 mm grid `u8` centred at `index` [N, 3], each mirrored
    along the patch axes `flip` (0 = z, 1 = y, 2 = x) when given."""
    size, batch = card.input.roi_size[0], card.input.batch_size
    scores = np.empty(len(index), dtype=np.float32)
    for i in range(0, len(index), batch):
        x = patches(u8, index[i:i + batch], size).astype(np.float32)
        x *= np.float32(1.0 / 255.0)
        if flip:
            x = np.ascontiguousarray(np.flip(x, axis=tuple(a + 1 for a in flip)))
        out = backend.infer({card.input.name: x[:, None]})[card.output.name]
        scores[i:i + len(x)] = 1.0 / (1.0 + np.exp(-np.asarray(out, dtype=np.float32).reshape(-1)))
    return scores


def _finding(volume: Volume, card: ModelCard, source_index: np.ndarray, probability: float, diameter: float
             ) -> Finding:
    spec = card.labels[0]
    z = int(np.clip(round(float(source_index[0])), 0, len(volume.sop_instance_uids) - 1))
    return Finding(label_index=spec.index, label=spec.name, finding_code=code_of(spec.finding),  # type: ignore[arg-type]
                   centre_mm=tuple(float(v) for v in volume.index_to_patient(source_index)),  # type: ignore[arg-type]
                   probability=float(probability), diameter_mm=float(diameter),
                   volume_mm3=float(np.pi / 6.0 * diameter ** 3), site_code=code_of(spec.site),
                   referenced_sop_instance_uid=volume.sop_instance_uids[z], tracking_uid=generate_uid(),
                   algorithm=algorithm_of(card))


def _paint_sphere(label_map: np.ndarray, volume: Volume, source_index: np.ndarray, diameter: float, value: int
                  ) -> None:
    """Set the free (0) voxels of a sphere of `diameter` mm around `source_index` to `value`."""
    sp = np.asarray(volume.spacing, dtype=np.float64)
    r = diameter / 2.0
    lo = np.maximum(0, np.floor(source_index - r / sp).astype(int))
    hi = np.minimum(label_map.shape, np.ceil(source_index + r / sp).astype(int) + 1)
    if np.any(hi <= lo):
        return
    grid = np.meshgrid(*(np.arange(a, b) for a, b in zip(lo, hi, strict=True)), indexing="ij")
    inside = sum(((g - c) * s) ** 2 for g, c, s in zip(grid, source_index, sp, strict=True)) <= r * r
    box = label_map[tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))]
    box[inside & (box == 0)] = value


def candidate_groups(centres_mm: np.ndarray, probability: np.ndarray, threshold: float,
                     taken: list[tuple[np.ndarray, float]], diameters_mm: np.ndarray | None = None
                     ) -> list[list[int]]:
    """The candidates at or above `threshold` as the gateway reports them: one group per nodule, most probable
    first. A group starts with a kept candidate, one lying neither within any (centre, radius) of `taken` (the
    first stage's findings) nor within a more probable kept one's radius (half its `diameters_mm`, 0 without
    them) + `SUPPRESS_MM` (the rule the first stage's findings get), and holds the candidates that lie within it
    (the first kept one's, in order). Candidates within a first-stage finding are in no group."""
    keep = np.flatnonzero(probability >= threshold)
    keep = keep[np.argsort(-probability[keep], kind="stable")]
    regions: list[tuple[np.ndarray, float, int]] = [(np.asarray(c, dtype=float), r, -1) for c, r in taken]
    groups: list[list[int]] = []
    for k in keep:
        p = np.asarray(centres_mm[k], dtype=float)
        owner = next((g for c, r, g in regions if np.linalg.norm(p - c) < r), None)
        if owner is None:
            own = 0.0 if diameters_mm is None else float(diameters_mm[k]) / 2.0
            regions.append((p, own + SUPPRESS_MM, len(groups)))
            groups.append([int(k)])
        elif owner >= 0:
            groups[owner].append(int(k))
    return groups


def group_centre(points: np.ndarray, probability: np.ndarray, group: list[int]) -> np.ndarray:
    """Where a group's nodule is reported: its candidates' mean weighted by their odds p / (1 - p). Overlapping
    blobs on one nodule all score near 1 and share the weight (on the held-out CTs the most probable lay up to 3 mm
    off a small nodule's centre, outside it), while a less certain blob beside the nodule (a vessel, the pleura)
    barely moves the mark: a p = 0.95 blob 4.3 mm from a 4 mm nodule's p = 0.999 one shifted a probability-weighted
    mean out of the nodule."""
    p = np.clip(np.asarray(probability, dtype=float)[group], 1e-6, 1.0 - 1e-6)
    w = p / (1.0 - p)
    return (w[:, None] * np.asarray(points, dtype=float)[group]).sum(axis=0) / w.sum()


def add_candidate_findings(scored: ScoredCandidates, volume: Volume, card: ModelCard, first: list[Finding],
                           label_map: np.ndarray) -> list[Finding]:
    """Findings for the candidates at or above `card.thresholds.probability`, one per `candidate_groups` group
    (none within a first-stage finding's radius + `SUPPRESS_MM`), most probable first: each at its group's
    `group_centre`, with the probability and diameter of the group's first. Their spheres are painted into
    `label_map` (only where it is 0)."""
    mm = volume.index_to_patient(scored.source_index) if len(scored.probability) else np.zeros((0, 3))
    taken = [(np.asarray(f.centre_mm), (f.diameter_mm or 0.0) / 2.0 + SUPPRESS_MM) for f in first]
    out: list[Finding] = []
    for group in candidate_groups(mm, scored.probability, card.thresholds.probability, taken, scored.diameter_mm):
        k, centre = group[0], group_centre(scored.source_index, scored.probability, group)
        out.append(_finding(volume, card, centre, float(scored.probability[k]), float(scored.diameter_mm[k])))
        _paint_sphere(label_map, volume, centre, float(scored.diameter_mm[k]), card.labels[0].index)
    return out


def usable_cores() -> int:
    """The CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@dataclass
class CandidateStage:
    """The `candidate_classification` stage: a loaded classifier and its card (threshold as composed)."""

    card: ModelCard
    backend: Backend
    threads: int = 0     # threads for the candidates' LoG filters; 0: the cores this process may use

    @property
    def algorithm(self) -> Algorithm:
        return algorithm_of(self.card)

    def findings(self, volume: Volume, found: list[Finding], label_map: np.ndarray) -> list[Finding]:
        """The findings this stage adds to `found` (painting theirs into `label_map`)."""
        threads = self.threads or usable_cores()
        scored = score_candidates(volume, self.backend, self.card, threads)
        extra = add_candidate_findings(scored, volume, self.card, found, label_map)
        log.info("candidate stage %s %s: %d candidates, %d findings added", self.card.name, self.card.version,
                 len(scored.probability), len(extra))
        return extra
