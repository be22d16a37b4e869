"""Training on tiny phantoms: the loss falls, resume continues, transforms match the gateway's preprocess, and
each shipped first-stage recipe trains and registers."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.training.shipped import FIRST_STAGE, tiny_first_stage
from training.config import DataConfig, TrainConfig, load_config
from training.datasets import generate_dataset, phantom_case
from training.device import cpu_has_bf16
from training.errors import TrainingError
from training.losses import DiceHardVoxelBCE
from training.train import train
from training.transforms import (
    SAMPLING_KEY,
    NoduleSamplingMapd,
    sampling_classes,
    sampling_ratios,
    spine_label_to_channel,
    train_transforms,
    val_transforms,
    window_hu,
)


def _cfg(tmp_path: Path, task: str = "lung-nodule", steps: int = 20, **kw) -> TrainConfig:
    base = dict(
        task=task, name="t", spacing_mm=(3.0, 3.0, 3.0), roi_size=(16, 32, 32), channels=(4, 8, 16),
        window=(-1000.0, 400.0), steps=steps, batch_size=1, num_samples=2, lr=5e-3, val_every=steps, seed=0,
        run_dir=tmp_path / "run", data=DataConfig(dir=tmp_path / "data", n_train=2, n_val=1, n_test=0,
                                                  phantom=True),
    )
    base.update(kw)
    return TrainConfig(**base)


def test_few_steps_lower_the_loss(tmp_path: Path) -> None:
    result = train(_cfg(tmp_path, task="spine-vertebrae", steps=30, window=(-500.0, 1300.0)), progress=False)
    losses = [h["loss"] for h in result.history]
    assert len(losses) == 30
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    assert (result.run_dir / "best.pt").is_file()
    rows = list(csv.DictReader((result.run_dir / "log.csv").open()))
    assert [int(r["step"]) for r in rows] == list(range(1, 31))
    assert rows[-1]["val_dice"] != ""


@pytest.mark.skipif(not cpu_has_bf16(), reason="this CPU has no native bfloat16 (AVX512-BF16/AMX)")
def test_bf16_on_cpu_lowers_the_loss_and_returns_a_float32_network(tmp_path: Path) -> None:
    result = train(_cfg(tmp_path, steps=30, cpu_bf16=True, hard_voxel_fraction=0.05), progress=False)
    losses = [h["loss"] for h in result.history]
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    weight = next(result.net.parameters())
    assert weight.dtype == torch.float32 and weight.is_contiguous()  # exported as a plain float32 graph


def test_hard_voxel_bce_weighs_a_confident_false_positive() -> None:
    """Plain BCE dilutes a 27-voxel false positive over the patch; the hard-voxel mean does not."""
    label = torch.zeros(1, 1, 32, 48, 48)
    label[..., 10:14, 10:14, 10:14] = 1.0
    right = torch.where(label > 0, 8.0, -8.0)
    wrong = right.clone()
    wrong[..., 20:23, 30:33, 30:33] = 8.0           # a confident blob where there is no nodule
    hard = DiceHardVoxelBCE(0.01)
    plain = torch.nn.BCEWithLogitsLoss()
    plain_rise = float(plain(wrong, label) - plain(right, label))
    hard_rise = float(hard(wrong, label) - hard(right, label))
    assert plain_rise < 0.01
    assert hard_rise > 0.3 and hard_rise > 50 * plain_rise


def test_resume_continues_from_checkpoint(tmp_path: Path) -> None:
    first = train(_cfg(tmp_path, steps=4, val_every=2), progress=False)
    assert first.step == 4 and (tmp_path / "run" / "last.pt").is_file()
    saved = torch.load(tmp_path / "run" / "last.pt", weights_only=False)
    assert saved["step"] == 4
    second = train(_cfg(tmp_path, steps=6, val_every=2), progress=False)
    assert second.step == 6
    assert [h["step"] for h in second.history] == [1, 2, 3, 4, 5, 6]
    assert [h["loss"] for h in second.history[:4]] == [h["loss"] for h in first.history]
    rows = list(csv.DictReader((tmp_path / "run" / "log.csv").open()))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5, 6]


def test_transforms_resample_and_window_like_the_model_contract(tmp_path: Path) -> None:
    entries = generate_dataset("lung-nodule", tmp_path, "test", 1, seed=3, phantom=True, progress=False)
    case = phantom_case("lung-nodule", 3)
    out = val_transforms("lung-nodule", (5.0, 4.0, 4.0), (-1000.0, 400.0))(entries[0])
    image = out["image"].numpy()
    z, y, x = case.hu.shape
    assert image.shape[0] == 1 and image.dtype == np.float32
    # (Z, Y, X) axis order kept; each axis resampled from its own spacing (2.5, 2, 2) mm
    assert abs(image.shape[1] - z * 2.5 / 5) <= 1 and abs(image.shape[2] - y * 2 / 4) <= 1
    assert abs(image.shape[3] - x * 2 / 4) <= 1
    # voxel 0 is not moved, so the windowed value there equals the numpy reference
    assert image[0, 0, 0, 0] == pytest.approx(window_hu(case.hu[:1, :1, :1], (-1000, 400))[0, 0, 0], abs=1e-5)
    assert image.min() >= 0.0 and image.max() <= 1.0
    assert set(np.unique(out["label"].numpy())) <= {0.0, 1.0}


def test_spine_labels_map_to_channels() -> None:
    label = np.array([0, 1, 7, 8, 19, 20, 24, 26, 25], dtype=np.uint8)
    assert spine_label_to_channel(label).tolist() == [0, 1, 7, 8, 19, 20, 24, 25, 0]


@pytest.mark.parametrize("spacing", [(3.0, 3.0, 3.0), (5.0, 1.7, 1.3)])
def test_training_transforms_equal_the_gateway_preprocess(tmp_path: Path, spacing: tuple) -> None:
    """MONAI Spacingd + ScaleIntensityRanged give the input inference.preprocess gives (same grid)."""
    from inference.model_card import ModelCard
    from inference.preprocess import preprocess
    from training.datasets import entry_volume
    from training.register import card_fields_for

    entry = generate_dataset("lung-nodule", tmp_path, "test", 1, seed=3, phantom=True, progress=False)[0]
    fields = card_fields_for("lung-nodule")
    fields["input"] = {**fields["input"], "spacing_mm": spacing}
    card = ModelCard.model_validate({**fields, "version": "1", "weights_sha256": "0" * 64})
    served, _ = preprocess(entry_volume(entry), card)
    trained = val_transforms("lung-nodule", spacing, card.input.window)(entry)["image"][0].numpy()
    common = tuple(slice(0, min(a, b)) for a, b in zip(served.shape, trained.shape, strict=True))
    assert all(abs(a - b) <= 1 for a, b in zip(served.shape, trained.shape, strict=True))  # edge rounding only
    np.testing.assert_allclose(trained[common], served[common], atol=1e-5)


@pytest.mark.parametrize("task", sorted(FIRST_STAGE))
def test_the_shipped_recipe_trains_evaluates_and_registers(tmp_path: Path, task: str) -> None:
    """A tiny variant of each shipped first-stage config (its network, spacing, window, flips, loss and sampling;
    3 steps on the phantom) through `dxgate train`: trained, scored held-out, registered, and re-registered
    without training again."""
    from dxgate.main import main
    from inference.model_repo import load_model
    from training.workflow import train_model

    config = tiny_first_stage(task, tmp_path)
    shipped = load_config(config)
    assert main(["train", task, "--config", str(config)]) == 0
    card = load_model(tmp_path / "models" / shipped.name).card
    assert tuple(card.input.spacing_mm) == shipped.spacing_mm and tuple(card.input.window) == shipped.window
    assert [tuple(a) for a in card.input.flips] == [tuple(a) for a in shipped.flips]
    assert card.training["network"]["channels"] == list(shipped.channels)
    if task == "lung-nodule":  # the threshold comes from the calibration scan, not the config's 0.5
        chosen = card.metrics["operating_point_selection"]
        assert card.thresholds.probability == chosen["probability"]
        assert chosen["calibration_scans"] == 1 and chosen["calibration_fp_per_scan"] <= 1.0
        assert card.metrics["operating_point"]["probability"] == chosen["probability"]
        assert card.training["loss"] == "DiceHardVoxelBCE (BCE over the hardest 5% of voxels)"
        assert card.metrics["figures"] == ["froc.png"]
    else:
        assert "operating_point_selection" not in card.metrics
    assert card.training["command"] == f"dxgate train {task} --config {config}"
    assert card.metrics["heldout_cases"] == 2
    key = "sensitivity_at_1fp_per_scan" if task == "lung-nodule" else "id_rate"
    assert key in card.metrics
    for figure in card.metrics["figures"]:  # the plots travel with the card
        assert (tmp_path / "models" / shipped.name / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    other = "spine-vertebrae" if task == "lung-nodule" else "lung-nodule"
    with pytest.raises(TrainingError, match="does not match the config's task"):
        train_model(other, config)
    # the same command on a finished run re-evaluates and re-registers without training again
    out = train_model(task, config)
    assert out["registered"] == str(tmp_path / "models" / shipped.name)
    again = load_model(tmp_path / "models" / shipped.name).card
    assert again.training["steps"] == 3 and again.training["seconds"] >= card.training["seconds"]
    assert again.weights_sha256 == card.weights_sha256


def test_an_unreadable_config_is_refused_before_training(tmp_path: Path) -> None:
    from training.workflow import train_model

    config = tmp_path / "broken.yaml"
    config.write_text("task: lung-nodule\nname: x\nstepz: 3\n")
    with pytest.raises(TrainingError, match=f"cannot read {config}"):
        train_model("lung-nodule", config)


def test_nodule_sampling_map_numbers_each_nodule_and_marks_lung() -> None:
    image = np.zeros((1, 10, 12, 12), np.float32)
    image[:, :, 2:10, 2:10] = (-850 + 1000) / 1400        # lung parenchyma in the window (-1000, 400)
    label = np.zeros_like(image, dtype=np.uint8)
    label[0, 1:3, 3:5, 3:5] = 1                              # nodule A
    label[0, 6:9, 6:9, 6:9] = 1                              # nodule B (touches nothing else)
    image[label > 0] = (30 + 1000) / 1400
    image[:, :, 0, 8:12] = (700 + 1000) / 1400               # a rib
    out = NoduleSamplingMapd(keys="image", window=(-1000.0, 400.0))({"image": image, "label": label})
    classes = out[SAMPLING_KEY][0]
    assert set(np.unique(classes[label[0] > 0])) == {3, 4}   # one class per nodule, whatever its size
    assert classes[1, 3, 3] != classes[7, 7, 7]
    assert classes[5, 2, 2] == 1 and classes[5, 0, 0] == 0   # lung vs elsewhere
    assert classes[5, 0, 9] == 2                             # bone
    assert sampling_ratios("lung-nodule", 1.0, 1.0)[:4] == [0.3, 0.4, 0.3, 1.0]
    assert len(sampling_ratios("spine-vertebrae", 1.0, 1.0)) == sampling_classes("spine-vertebrae") == 26


@pytest.mark.parametrize("task", ["lung-nodule", "spine-vertebrae"])
def test_training_patches_hold_every_class_in_proportion(tmp_path: Path, task: str) -> None:
    """Patch centres come from the cached per-class candidates: positives appear in most patches."""
    window = (-1000.0, 400.0) if task == "lung-nodule" else (-500.0, 1300.0)
    entries = generate_dataset(task, tmp_path, "training", 1, seed=5, phantom=True, progress=False)
    chain = train_transforms(task, (3.0, 3.0, 3.0), window, (8, 16, 16), num_samples=40, pos=3.0, neg=1.0)
    patches = chain(entries[0])
    assert len(patches) == 40 and all(p["image"].shape == (1, 8, 16, 16) for p in patches)
    with_foreground = sum(bool((p["label"] > 0).any()) for p in patches)
    assert with_foreground >= 20


ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("config", sorted(p.relative_to(ROOT) for p in (ROOT / "training" / "configs").glob("*.yaml")),
                         ids=lambda p: p.stem)
def test_shipped_configs_load_and_match_the_models_they_register(config: Path) -> None:
    import json

    import yaml

    if yaml.safe_load((ROOT / config).read_text())["task"] == "lung-nodule-candidates":   # training.second_stage
        from training.second_stage import load_config as load_second_stage_config

        second = load_second_stage_config(ROOT / config)
        card = json.loads((ROOT / "models" / second.name / "metadata.json").read_text())
        first = json.loads((ROOT / second.first_stage / "metadata.json").read_text())
        assert second.name in [stage.get("model") for stage in first["stages"]]   # the first stage composes it
        assert [tuple(a) for a in card["input"].get("flips", [])] == [tuple(a) for a in second.flips]
        assert card["input"].get("flip_screen", 0.0) == second.flip_screen
        command = card["training"]["command"]       # its own command, or the lung command's --second-stage
        assert command.endswith((f"lung-nodule-candidates --config {config}", f"--second-stage {config}"))
        return
    cfg = load_config(ROOT / config)
    assert cfg.register_to is not None
    card = json.loads((ROOT / cfg.register_to / cfg.name / "metadata.json").read_text())
    assert tuple(card["input"]["spacing_mm"]) == cfg.spacing_mm and tuple(card["input"]["window"]) == cfg.window
    assert tuple(card["input"]["roi_size"]) == cfg.roi_size
    assert [tuple(a) for a in card["input"].get("flips", [])] == [tuple(a) for a in cfg.flips]
    assert card["training"]["command"].split(" --second-stage ")[0].endswith(f"--config {config}")


def test_cases_generated_in_parallel_are_those_generated_one_by_one(tmp_path: Path) -> None:
    """Each case depends on its seed only, so `workers` processes write the same files and entries."""
    import json

    serial = generate_dataset("lung-nodule", tmp_path / "a", "test", 2, seed=9001, rows=48, slices=30, progress=False)
    parallel = generate_dataset("lung-nodule", tmp_path / "b", "test", 2, seed=9001, rows=48, slices=30,
                                progress=False, workers=2)
    assert [e["seed"] for e in parallel] == [9001, 9002]
    for a, b in zip(serial, parallel, strict=True):
        assert {k: v for k, v in a.items() if k not in ("image", "label")} == \
            {k: v for k, v in b.items() if k not in ("image", "label")}
        assert Path(a["image"]).read_bytes() == Path(b["image"]).read_bytes()
        assert Path(a["label"]).read_bytes() == Path(b["label"]).read_bytes()
    meta = [json.loads((tmp_path / d / "datalist.json").read_text())["generation"] for d in ("a", "b")]
    assert meta[0] == meta[1]    # the same parameters recorded: either set is reused by the other's call
