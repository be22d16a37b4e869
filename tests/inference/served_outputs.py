"""What the shipped models serve on a synthetic CT, summarised for comparison: findings, SR, SEG and GSPS content.

`served(models, model, study)` runs one model of a models folder as its card composes it (the builder the gateway
uses) and encodes its SR, SEG and GSPS; `summary` reduces those to plain JSON values: generated UIDs become their
order of first appearance, source images their slice index, label volumes a voxel count per value and a sha256.
`python -m tests.inference.served_outputs OUT.json` writes the summaries `test_shipped_models` compares with.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pydicom

from inference.backends.factory import make_backend
from inference.composition import build_runner
from inference.encode import encode_gsps, encode_seg, encode_sr
from inference.findings import InferenceResult
from inference.model_repo import discover_models

REPO_MODELS = Path(__file__).resolve().parents[2] / "models"
# (case, model, writer, its keyword arguments): small synthetic CTs the shipped models accept
CASES: tuple[tuple[str, str, str, dict[str, int]], ...] = (
    ("lung_pair", "lung_nodule_ct", "write_chest_ct_study", {"nodules": 3, "slices": 60, "seed": 11, "rows": 128}),
)


class Names:
    """Stable names for UIDs: source images by slice index, every other UID by order of first appearance."""

    def __init__(self, source_uids: Sequence[str]) -> None:
        self.slices = {u: i for i, u in enumerate(source_uids)}
        self.others: dict[str, str] = {}

    def __call__(self, uid: object) -> str | int:
        u = str(uid)
        return self.slices[u] if u in self.slices else self.others.setdefault(u, f"uid{len(self.others)}")


def _code(item: pydicom.Dataset) -> str:
    return f"{item.CodingSchemeDesignator} {item.CodeValue}"


def _value(item: pydicom.Dataset, names: Names) -> Any:
    """The value of one SR content item (PS3.3 C.17.3) in plain JSON."""
    kind = item.ValueType
    if kind == "TEXT":
        return item.TextValue
    if kind == "CODE":
        return _code(item.ConceptCodeSequence[0])
    if kind == "NUM":
        measured = item.MeasuredValueSequence[0]
        return [float(measured.NumericValue), measured.MeasurementUnitsCodeSequence[0].CodeValue]
    if kind == "UIDREF":
        return names(item.UID)
    if kind in ("IMAGE", "COMPOSITE"):
        ref = item.ReferencedSOPSequence[0]
        segments = np.ravel([ref.ReferencedSegmentNumber]) if "ReferencedSegmentNumber" in ref else []
        return [names(ref.ReferencedSOPInstanceUID), *(int(n) for n in segments)]
    if kind == "SCOORD3D":
        return [item.GraphicType, [float(v) for v in item.GraphicData], names(item.ReferencedFrameOfReferenceUID)]
    return None


def sr_tree(items: Sequence[pydicom.Dataset], names: Names) -> list[list[Any]]:
    """[value type, concept name, value, children] for each content item, recursively; the image library's
    entries without their descriptors (copied from the source headers)."""
    out = []
    for item in items:
        name = item.ConceptNameCodeSequence[0].CodeMeaning if "ConceptNameCodeSequence" in item else ""
        entry = [item.ValueType, name, _value(item, names)]
        if "ContentSequence" in item and name != "Source":
            entry.append(sr_tree(item.ContentSequence, names))
        out.append(entry)
    return out


def _labels(volume: np.ndarray) -> dict[str, Any]:
    values, counts = np.unique(volume, return_counts=True)
    return {"voxels": {str(int(v)): int(c) for v, c in zip(values, counts, strict=True) if v},
            "sha256": hashlib.sha256(np.ascontiguousarray(volume, dtype=np.uint16).tobytes()).hexdigest()}


def seg_summary(seg: pydicom.Dataset, shape: tuple[int, ...], names: Names) -> dict[str, Any]:
    """Each segment's description and the label volume its frames make on the source grid."""
    segments = []
    for d in seg.SegmentSequence:
        algo = d.SegmentationAlgorithmIdentificationSequence[0] if "SegmentationAlgorithmIdentificationSequence" in d \
            else None
        segments.append({
            "number": int(d.SegmentNumber), "label": d.SegmentLabel, "algorithm_type": d.SegmentAlgorithmType,
            "type": _code(d.SegmentedPropertyTypeCodeSequence[0]),
            "category": _code(d.SegmentedPropertyCategoryCodeSequence[0]),
            "algorithm": None if algo is None else [algo.AlgorithmName, algo.AlgorithmVersion,
                                                    str(algo.get("AlgorithmParameters", ""))],
            "tracking": [d.get("TrackingID"), names(d.TrackingUID) if "TrackingUID" in d else None],
            "region": [_code(r) for r in d.get("AnatomicRegionSequence", [])]})
    volume = np.zeros(shape, dtype=np.uint16)
    pixels = seg.pixel_array.reshape(-1, *shape[1:])
    for frame, item in zip(pixels, seg.PerFrameFunctionalGroupsSequence, strict=True):
        number = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        source = item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        volume[names(source)][frame > 0] = number
    return {"segments": segments, "labels": _labels(volume), "description": seg.ContentDescription}


def gsps_summary(gsps: pydicom.Dataset, names: Names) -> list[dict[str, Any]]:
    """Each graphic annotation: the image it is on, its texts and graphics (PS3.3 C.10.5)."""
    out = []
    for ann in gsps.GraphicAnnotationSequence:
        out.append({
            "image": [names(r.ReferencedSOPInstanceUID) for r in ann.ReferencedImageSequence],
            "layer": ann.GraphicLayer,
            "texts": [[t.UnformattedTextValue, [float(v) for v in t.get("AnchorPoint", [])]]
                      for t in ann.get("TextObjectSequence", [])],
            "graphics": [[g.GraphicType, [float(v) for v in g.GraphicData]]
                         for g in ann.get("GraphicObjectSequence", [])]})
    return out


def summary(result: InferenceResult, card_name: str, sr: pydicom.Dataset, seg: pydicom.Dataset | None,
            gsps: pydicom.Dataset | None) -> dict[str, Any]:
    """The served result and its encodings as plain JSON values."""
    names = Names(result.source_sop_instance_uids)
    findings = [{
        "label": [f.label_index, f.label, f.finding_code.value], "centre_mm": list(f.centre_mm),
        "probability": f.probability, "diameter_mm": f.diameter_mm, "volume_mm3": f.volume_mm3,
        "slice": names(f.referenced_sop_instance_uid), "tracking": names(f.tracking_uid),
        "algorithm": card_name if f.algorithm is None else f.algorithm.name} for f in result.findings]
    return {
        "model": [result.model_name, result.model_version, result.weights_sha256],
        "findings": findings, "label_map": _labels(np.asarray(result.label_map)),
        "sr": sr_tree(sr.ContentSequence, names),
        "seg": None if seg is None else seg_summary(seg, np.asarray(result.label_map).shape, names),
        "gsps": None if gsps is None else gsps_summary(gsps, names),
    }


def encoded(result: InferenceResult, card: Any, paths: Sequence[Path]) -> dict[str, Any]:
    """SR, SEG and GSPS of `result` as the worker encodes them, summarised."""
    sources = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
    seg = encode_seg(result, card, sources)
    sr = encode_sr(result, card, sources, seg=seg)
    return summary(result, card.name, sr, seg, encode_gsps(result, card, sources))


def served(models_dir: Path, model: str, study: Path) -> dict[str, Any]:
    """`model` of `models_dir`, built as its card composes it, on the series in `study`, summarised."""
    found = discover_models(models_dir)
    backends = {name: make_backend(m, "onnxruntime") for name, m in found.items()}
    try:
        runner = build_runner(found[model], found, backends)
        paths = sorted(study.glob("*.dcm"))
        return encoded(runner.run(paths), found[model].card, paths)
    finally:
        for backend in backends.values():
            backend.close()


def write_case(writer: str, out: Path, kwargs: Mapping[str, int]) -> Path:
    """One synthetic CT of `training.synthetic` (`writer` names the function) into `out`."""
    import training.synthetic as synthetic

    getattr(synthetic, writer)(out, **kwargs)
    return out


def main(out: Path, work: Path) -> None:
    cases = {name: served(REPO_MODELS, model, write_case(writer, work / name, kwargs))
             for name, model, writer, kwargs in CASES}
    out.write_text(json.dumps(cases, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        main(Path(sys.argv[1]), Path(tmp))
