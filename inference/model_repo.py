"""Reads `models/`: one folder per model in Triton's layout plus the dxgate model card."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from inference.errors import ModelCardError, ModelNotFoundError
from inference.model_card import ModelCard


@dataclass(frozen=True)
class RegisteredModel:
    card: ModelCard
    folder: Path
    weights_path: Path

    @property
    def name(self) -> str:
        return self.card.name

    @property
    def version(self) -> str:
        return self.card.version


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _pbtxt_field(text: str, key: str) -> str | None:
    m = re.search(rf'^\s*{key}\s*:\s*"?([^"\n]+)"?', text, re.MULTILINE)
    return m.group(1).strip() if m else None


def load_model(folder: Path, verify_sha256: bool = True) -> RegisteredModel:
    """Load and cross-check one model folder; raises ModelCardError naming what disagrees."""
    card_path = folder / "metadata.json"
    if not card_path.is_file():
        raise ModelNotFoundError(f"{folder} has no metadata.json")
    try:
        card = ModelCard.model_validate(json.loads(card_path.read_text(encoding="utf-8")))
    except (ValidationError, json.JSONDecodeError) as exc:
        raise ModelCardError(f"{card_path}: {exc}") from exc
    if card.name != folder.name:
        raise ModelCardError(f"{card_path}: name {card.name!r} differs from folder {folder.name!r}")
    pbtxt = folder / "config.pbtxt"
    if not pbtxt.is_file():
        raise ModelCardError(f"{folder} has no config.pbtxt")
    text = pbtxt.read_text(encoding="utf-8")
    if _pbtxt_field(text, "name") not in (None, card.name):
        raise ModelCardError(f"{pbtxt}: name differs from the model card's {card.name!r}")
    if _pbtxt_field(text, "platform") != "onnxruntime_onnx" and _pbtxt_field(text, "backend") != "onnxruntime":
        raise ModelCardError(f"{pbtxt}: expected platform onnxruntime_onnx or backend onnxruntime")
    for tensor in (card.input.name, card.output.name):
        if f'"{tensor}"' not in text:
            raise ModelCardError(f"{pbtxt}: tensor {tensor!r} from the model card is not declared")
    weights = folder / card.version / card.weights_file
    if not weights.is_file():
        raise ModelCardError(f"{folder}: weights {weights.relative_to(folder)} missing")
    if verify_sha256 and sha256_file(weights) != card.weights_sha256:
        raise ModelCardError(f"{weights}: sha256 differs from the model card")
    return RegisteredModel(card=card, folder=folder, weights_path=weights)


def discover_models(models_dir: Path) -> dict[str, RegisteredModel]:
    """Every valid model under models_dir, by name. Folders without metadata.json are skipped."""
    found: dict[str, RegisteredModel] = {}
    if not models_dir.is_dir():
        return found
    for folder in sorted(p for p in models_dir.iterdir() if p.is_dir()):
        if (folder / "metadata.json").is_file():
            model = load_model(folder)
            found[model.name] = model
    return found


def composing_models(name: str, models: Mapping[str, RegisteredModel]) -> list[str]:
    """The models among `models` whose card runs `name` as one of its later stages (`ModelCard.stages`)."""
    return sorted(m.name for m in models.values() if any(s.model == name for s in m.card.stages[1:]))
