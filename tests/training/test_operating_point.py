"""The lung card's probability threshold is chosen on calibration scans at a false-positive budget."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from training.datasets import Case, resolve, write_case
from training.register import card_fields_for
from training.scoring.heldout import choose_operating_point, found_by_group, nodule_surroundings


class _IntensityModel:
    """A fixed, deterministic network: logit = 20 x (windowed intensity - 0.3) (denser = more nodule-like)."""

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"logits": (20.0 * (inputs["image"] - 0.3)).astype(np.float32)}

    def close(self) -> None:
        return None


def _blob(shape: tuple[int, ...], centre: tuple[int, int, int], radius: float) -> np.ndarray:
    grids = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    return sum((g - c) ** 2 for g, c in zip(grids, centre, strict=True)) <= radius**2


def _case(tmp_path: Path) -> dict:
    """Aerated lung with a true solid nodule (40 HU) and two dense spots that are not nodules."""
    shape, spacing = (40, 64, 64), (1.5, 1.5, 1.5)
    hu = np.full(shape, -850, np.int16)
    hu[_blob(shape, (20, 20, 20), 4)] = 40       # the nodule: p ~ 1.0
    hu[_blob(shape, (20, 44, 44), 4)] = -200     # false positive, p ~ 0.995
    hu[_blob(shape, (10, 44, 20), 4)] = -500     # false positive, p ~ 0.77
    centre_mm = [20 * 1.5, 20 * 1.5, 20 * 1.5]
    case = Case(hu=hu, label_map=np.zeros(shape, np.uint8), spacing=spacing, origin=(0.0, 0.0, 0.0),
                truth={"nodules": [{"centre_mm": centre_mm, "diameter_mm": 12.0}]})
    return resolve(write_case(tmp_path, "calibration_000001", case, 1), tmp_path)


def _p(hu: float) -> float:
    return float(1.0 / (1.0 + np.exp(-20.0 * ((hu + 1000.0) / 1400.0 - 0.3))))


@pytest.mark.parametrize(("budget", "fps", "above", "below"), [
    (0.5, 0.0, _p(-200), _p(40)),    # only the nodule
    (1.0, 1.0, _p(-500), _p(-200)),  # the nodule and the denser false positive
    (2.0, 2.0, 0.5, _p(-500)),       # everything above the floor (0.5)
])
def test_lowest_threshold_within_the_false_positive_budget(tmp_path: Path, budget, fps, above, below) -> None:
    fields = card_fields_for("lung-nodule")
    chosen = choose_operating_point(fields, [_case(tmp_path)], _IntensityModel(), budget)
    assert chosen["calibration_fp_per_scan"] == fps
    assert chosen["calibration_sensitivity"] == 1.0 and chosen["calibration_nodules"] == 1
    assert above <= chosen["probability"] < below   # the cut lies between kept and dropped candidates


def test_found_by_group_counts_hits_per_kind_size_and_pleura() -> None:
    entries = [
        {"seed": 1, "nodules": [
            {"centre_mm": [0, 0, 0], "diameter_mm": 4.0, "kind": "ground-glass", "juxtapleural": False},
            {"centre_mm": [50, 0, 0], "diameter_mm": 12.0, "kind": "solid", "juxtapleural": True}]},
        {"seed": 2, "nodules": [
            {"centre_mm": [0, 0, 0], "diameter_mm": 8.0, "kind": "solid", "juxtapleural": True}]},
    ]
    preds = [[((1.5, 0, 0), 0.9), ((50, 7, 0), 0.8)],   # a hit (1.5 < 2 mm); 7 mm off a 6 mm radius: a miss
             [((0, 3.9, 0), 0.7)]]                       # 3.9 < 4 mm: a hit
    out = found_by_group(preds, entries)
    assert out["found"] == {"10-30 mm": "0/1", "3-6 mm": "1/1", "6-10 mm": "1/1", "ground-glass": "1/1",
                            "juxtapleural": "1/2", "solid": "1/2"}
    assert out["missed"] == [{"seed": 1, "diameter_mm": 12.0, "kind": "solid", "juxtapleural": True}]


def test_nodule_surroundings_tells_a_nodule_on_the_pleura_from_one_alone() -> None:
    """Dense fraction of the 1-4 mm shell: 0 in open lung, ~0.4 against a wall; grouped as attached/isolated."""
    from types import SimpleNamespace

    from inference.volume import Volume

    hu = np.full((40, 60, 60), -850.0, dtype=np.float32)
    hu[:, :, 40:] = 40.0                                   # chest wall from x = 40 voxels (60 mm) on
    volume = Volume(voxels=hu, spacing=(1.5, 1.5, 1.5), origin=np.zeros(3), direction=np.eye(3),
                    sop_instance_uids=[f"2.25.{i + 1}" for i in range(40)], modality="CT",
                    frame_of_reference_uid="2.25.1")
    info = SimpleNamespace(source_spacing=(1.5, 1.5, 1.5), target_spacing=(1.5, 1.5, 1.5))
    entry = {"seed": 1, "nodules": [
        {"centre_mm": [20.0, 45.0, 30.0], "diameter_mm": 4.0, "kind": "solid", "juxtapleural": False},
        {"centre_mm": [57.0, 45.0, 30.0], "diameter_mm": 4.0, "kind": "solid", "juxtapleural": True}]}
    alone, on_wall = nodule_surroundings(entry, volume, info, hu)
    assert alone == 0.0
    assert 0.2 < on_wall < 0.6
    out = found_by_group([[((20.0, 45.0, 30.0), 0.9)]], [entry], [[alone, on_wall]])
    assert out["found"]["isolated"] == "1/1" and out["found"]["attached"] == "0/1"
    assert out["missed"][0]["dense_fraction"] == round(on_wall, 2)
