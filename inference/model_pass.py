"""The network's output over one preprocessed image, as the model card asks: sliding window plus flips.

`card.input.flips` lists extra passes over mirrored copies of the image (test-time augmentation): each
entry names the model-grid axes mirrored (0 = slice, 1 = row, 2 = column; `[]` would repeat the plain
pass). Every pass is mirrored back, the activated outputs (sigmoid or softmax probabilities) of the plain
pass and the flipped passes are averaged, and the mean is returned as logits again (log-odds for sigmoid,
log-probabilities for softmax), so postprocessing is the same with or without flips. Mirroring costs
one full sliding-window pass each; it removes findings that only one orientation of the network sees.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from inference.backends.base import Backend
from inference.model_card import ModelCard
from inference.sliding_window import sliding_window_infer

_EPS = 1e-7


def _activate(logits: np.ndarray, activation: str) -> np.ndarray:
    """`postprocess.sigmoid` / `softmax`, but in place in `logits`, so a pass costs no second model-grid map."""
    if activation == "sigmoid":
        logits *= np.float32(0.5)
        np.tanh(logits, out=logits)
        logits += np.float32(1.0)
        logits *= np.float32(0.5)
        return logits
    logits -= logits.max(axis=0, keepdims=True)
    np.exp(logits, out=logits)
    logits /= logits.sum(axis=0, keepdims=True)
    return logits


def _to_logits(probs: np.ndarray, activation: str) -> np.ndarray:
    np.clip(probs, _EPS, 1.0 - _EPS, out=probs)
    if activation == "sigmoid":
        return np.log(probs / (1.0 - probs)).astype(np.float32, copy=False)
    return np.log(probs).astype(np.float32, copy=False)


def model_logits(image_zyx: np.ndarray, backend: Backend, card: ModelCard,
                 mode: Literal["gaussian", "constant"] = "gaussian") -> np.ndarray:
    """Logits [C, Z, Y, X] of `backend` over the model-grid image, with the card's test-time flips."""
    spec = card.input

    def one_pass(image: np.ndarray) -> np.ndarray:
        return sliding_window_infer(image, backend, spec.name, card.output.name, spec.roi_size, spec.overlap,
                                    spec.batch_size, card.output.channels, mode=mode)

    logits = one_pass(image_zyx)
    if not spec.flips:
        return logits
    activation = card.output.activation
    total = _activate(logits, activation)
    del logits
    for axes in spec.flips:
        mirrored = np.flip(image_zyx, axis=tuple(axes)) if axes else image_zyx   # a view: no copy of the image
        probs = _activate(one_pass(mirrored), activation)
        total += np.flip(probs, axis=tuple(a + 1 for a in axes)) if axes else probs
        del probs
    total /= np.float32(1 + len(spec.flips))
    return _to_logits(total, activation)
