"""Register a trained network as `models/<name>/`: Triton config.pbtxt + model card + <version>/model.onnx.

The folder serves Triton's onnxruntime backend directly and is read by `inference.model_repo.load_model`,
which cross-checks names, platform and the weights' sha256.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from inference.model_card import ModelCard
from inference.model_repo import load_model, sha256_file
from training.export import export_onnx, onnx_io_names, parity_check
from training.transforms import SPINE_LEVELS

_SCT_VERTEBRA = {  # SNOMED CT body structures, as in the DICOM anatomic codes (PS3.16) used by dcmqi/Slicer
    "C1": "14806007", "C2": "39976000", "C3": "113205007", "C4": "5329002", "C5": "36978003",
    "C6": "36054005", "C7": "87391001", "T1": "64864005", "T2": "53733008", "T3": "1626008",
    "T4": "73071006", "T5": "56401006", "T6": "45296009", "T7": "62487009", "T8": "11068009",
    "T9": "82687006", "T10": "7610001", "T11": "12989004", "T12": "23215003", "L1": "66794005",
    "L2": "14293000", "L3": "36470004", "L4": "11994002", "L5": "49668003", "Sacrum": "54735007",
}
# Nodules are opacities: even pure ground glass is some 200 HU above aerated lung (about -850 HU). A
# "nodule" averaging below -900 HU is air (noise outside the body, a gas bubble), not tissue. Above
# +200 HU it is bone (rib, vertebra, sternum) or a calcified nodule, a benign pattern (Lung-RADS 1) this
# detector does not report.
MIN_NODULE_MEAN_HU = -900.0
MAX_NODULE_MEAN_HU = 200.0
ANATOMICAL_STRUCTURE = {"value": "91723000", "scheme": "SCT", "meaning": "Anatomical Structure"}


def _vertebra_label(index: int, level: str) -> dict[str, Any]:
    meaning = "Sacrum" if level == "Sacrum" else f"{level} vertebra"
    code = {"value": _SCT_VERTEBRA[level], "scheme": "SCT", "meaning": meaning}
    return {"index": index, "name": level, "finding": code, "category": ANATOMICAL_STRUCTURE, "site": code}


def card_fields_for(task: str, name: str | None = None, **overrides: Any) -> dict[str, Any]:
    """Default model-card fields (everything except version and weights_sha256) for a training task.

    `task` is "lung-nodule" or "spine-vertebrae"; `overrides` replace top-level fields (e.g. input,
    training, metrics).
    """
    if task == "lung-nodule":
        fields: dict[str, Any] = {
            "name": name or "lung_nodule_ct",
            "task": "lung-nodule-detection",
            "description": "Lung nodule detection in chest CT: 3-D U-Net, one sigmoid channel; components of "
            "the probability map above the threshold are reported as nodules.",
            "modality": ["CT"],
            "body_part": ["CHEST"],
            "postprocess": "nodules",
            "input": {"name": "image", "spacing_mm": (1.5, 1.5, 1.5), "window": (-1000.0, 400.0),
                      "roi_size": (48, 64, 64), "overlap": 0.25, "batch_size": 1},
            "output": {"name": "logits", "activation": "sigmoid", "channels": 1},
            "labels": [{
                "index": 1, "name": "Lung nodule",
                "finding": {"value": "27925004", "scheme": "SCT", "meaning": "Nodule"},
                "category": {"value": "49755003", "scheme": "SCT", "meaning": "Morphologically abnormal structure"},
                "site": {"value": "39607008", "scheme": "SCT", "meaning": "Lung"},
            }],
            "thresholds": {"probability": 0.5, "min_diameter_mm": 2.0, "min_volume_mm3": 0.0,
                           "min_mean_hu": MIN_NODULE_MEAN_HU, "max_mean_hu": MAX_NODULE_MEAN_HU},
            "series": {"modalities": ["CT"], "orientation": ["axial"], "min_slices": 16,
                       "max_slice_thickness_mm": 3.0, "prefer": "thinnest"},
        }
    elif task == "spine-vertebrae":
        fields = {
            "name": name or "spine_vertebrae_ct",
            "task": "vertebra-labelling",
            "description": "Vertebra labelling in CT (C1-L5 and sacrum): 3-D U-Net, softmax over background + "
            "25 levels; the largest component of each level is reported with its centroid, levels found out of "
            "cranio-caudal order are dropped.",
            "modality": ["CT"],
            "body_part": ["SPINE", "CSPINE", "TSPINE", "LSPINE", "CHEST", "ABDOMEN"],
            "postprocess": "vertebrae",
            "ordered_levels": True,
            "input": {"name": "image", "spacing_mm": (4.0, 4.0, 4.0), "window": (-500.0, 1300.0),
                      "roi_size": (48, 48, 48), "overlap": 0.25, "batch_size": 1},
            "output": {"name": "logits", "activation": "softmax", "channels": 1 + len(SPINE_LEVELS)},
            "labels": [_vertebra_label(i, level) for i, level in enumerate(SPINE_LEVELS, start=1)],
            "thresholds": {"probability": 0.5, "min_diameter_mm": 0.0, "min_volume_mm3": 500.0},
            "series": {"modalities": ["CT"], "orientation": ["axial"], "min_slices": 16,
                       "max_slice_thickness_mm": 5.0, "prefer": "thinnest"},
        }
    else:
        raise ValueError(f"unknown task {task!r} (expected 'lung-nodule' or 'spine-vertebrae')")
    fields.update(overrides)
    return fields


def config_pbtxt(name: str, input_name: str, output_name: str, channels: int) -> str:
    """Triton model configuration for the onnxruntime backend.

    max_batch_size 0: the batch axis is part of `dims` (dynamic, -1), as exported, so Triton passes the
    client's batch through unchanged and no dynamic batcher is configured. KIND_AUTO lets the same folder
    run on GPU and CPU-only servers (KIND_GPU is refused by a server without GPUs).
    """
    return (
        f'name: "{name}"\n'
        'platform: "onnxruntime_onnx"\n'
        "max_batch_size: 0\n"
        f'input [\n  {{\n    name: "{input_name}"\n    data_type: TYPE_FP32\n    dims: [ -1, 1, -1, -1, -1 ]\n  }}\n]\n'
        f'output [\n  {{\n    name: "{output_name}"\n    data_type: TYPE_FP32\n'
        f"    dims: [ -1, {channels}, -1, -1, -1 ]\n  }}\n]\n"
        "instance_group [\n  {\n    count: 1\n    kind: KIND_AUTO\n  }\n]\n"
    )


def register_model(
    net: torch.nn.Module, card_fields: dict[str, Any], models_dir: Path, version: str = "1",
    parity_inputs: Sequence[np.ndarray] | None = None, atol: float = 1e-4,
    extra_files: Mapping[str, Path] | None = None,
) -> Path:
    """Export `net`, check parity, write the complete folder models_dir/<name>/ and verify it loads.

    `card_fields` are ModelCard fields without version/weights_sha256 (see `card_fields_for`).
    `parity_inputs` default to one random [1, 1, *roi_size] patch. `extra_files` (name -> file, e.g.
    the held-out FROC plot) are copied next to the card; Triton ignores them. The folder is assembled in a
    temporary directory and swapped in at the end, so a failure never leaves a half-written model.
    Returns the model folder.
    """
    name = card_fields["name"]
    roi = tuple(card_fields["input"]["roi_size"])
    if parity_inputs is None:
        rng = np.random.default_rng(0)
        parity_inputs = [rng.random((1, 1, *roi), dtype=np.float32)]
    models_dir.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=models_dir))
    try:
        folder = stage / name
        weights = folder / version / card_fields.get("weights_file", "model.onnx")
        example = torch.from_numpy(np.asarray(parity_inputs[0], dtype=np.float32))
        in_name, out_name = card_fields["input"]["name"], card_fields["output"]["name"]
        export_onnx(net, example, weights, input_name=in_name, output_name=out_name)
        if onnx_io_names(weights) != ([in_name], [out_name]):
            raise RuntimeError(f"{weights}: graph I/O {onnx_io_names(weights)} != card ({in_name}, {out_name})")
        max_diff = parity_check(net, weights, parity_inputs, atol=atol)
        fields = dict(card_fields)
        fields["training"] = {**fields.get("training", {}), "onnx_parity_max_abs_diff": max_diff,
                              "onnx_opset": 17}
        card = ModelCard.model_validate({**fields, "version": version, "weights_sha256": sha256_file(weights)})
        (folder / "metadata.json").write_text(card.model_dump_json(indent=2) + "\n", encoding="utf-8")
        (folder / "config.pbtxt").write_text(
            config_pbtxt(name, in_name, out_name, card.output.channels), encoding="utf-8"
        )
        for file_name, source in (extra_files or {}).items():
            if Path(file_name).name != file_name or file_name[0].isdigit():
                raise ValueError(f"extra file {file_name!r} must be a plain name that is not a version")
            shutil.copyfile(source, folder / file_name)
        load_model(folder)  # the same cross-check the gateway performs
        target = models_dir / name
        old = stage / "previous"
        if target.exists():
            target.rename(old)
        folder.rename(target)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return target


def declare_stages(folder: Path, stages: Sequence[Mapping[str, Any]]) -> Path:
    """Declare in the card of the registered model at `folder` what produces its findings (`ModelCard.stages`,
    the composition `inference.composition.build_runner` builds its runner from); the weights are untouched.

    The card keeps its other fields and their order (`stages` goes after `series` when new); it is checked as the
    gateway loads it and replaced atomically. Returns the folder.
    """
    load_model(folder)
    fields = read_card(folder)
    declared = [dict(s) for s in stages]
    if "stages" in fields:
        fields["stages"] = declared
    else:
        at = list(fields).index("series") + 1 if "series" in fields else len(fields)
        items = list(fields.items())
        fields = dict([*items[:at], ("stages", declared), *items[at:]])
    ModelCard.model_validate(fields)
    tmp = folder / ".metadata.json.tmp"
    tmp.write_text(json.dumps(fields, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(folder / "metadata.json")
    return folder


def declare_candidate_stage(first: Path, classifier: str, probability: float | None,
                            first_probability: float | None = None) -> Path:
    """Declare the registered model at `first` a composition: its own segmentation at `first_probability`, then
    candidate classification by the registered model `classifier` at `probability` (None: each its own threshold)."""
    return declare_stages(first, [
        {"kind": "segmentation", "model": None, "probability": first_probability},
        {"kind": "candidate_classification", "model": classifier, "probability": probability},
    ])


def read_card(folder: Path) -> dict[str, Any]:
    """The model card of a registered folder as a plain dict."""
    return json.loads((folder / "metadata.json").read_text(encoding="utf-8"))
