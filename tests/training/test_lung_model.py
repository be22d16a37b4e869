"""`dxgate train lung-nodule --second-stage CONFIG` on tiny data: both stages trained, calibrated, evaluated and
registered by one command, and served together by the gateway."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from inference.model_repo import load_model
from tests.training.shipped import SECOND_STAGE, tiny_first_stage, tiny_second_stage


def _configs(root: Path) -> tuple[Path, Path]:
    """Tiny variants of the shipped pair: lung_nodule.yaml and lung_nodule_candidates.yaml (two short rounds)."""
    second = tiny_second_stage(root, [{"seeds": [3000, 3003], "steps": 20}, {"seeds": [3003, 3005], "steps": 10,
                                                                             "painted": 4}],
                               first_stage="models/lung_nodule_ct", run_dir=str(root / "unused"),  # replaced
                               register_to=None)
    # the first stage's own held-out and calibration sets are not used: the second stage's serve both
    config = tiny_first_stage("lung-nodule", root)
    return config, second


@pytest.fixture(scope="module")
def lung_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from dxgate.main import main

    root = tmp_path_factory.mktemp("lung_model")
    config, second = _configs(root)
    assert main(["train", "lung-nodule", "--config", str(config), "--second-stage", str(second)]) == 0
    return root, config


def test_one_command_registers_both_stages_the_second_naming_the_first(lung_model: tuple[Path, Path]) -> None:
    root, config = lung_model
    first = load_model(root / "models" / "lung_nodule_ct").card
    second = load_model(root / "models" / "lung_nodule_candidates_ct").card
    assert [s.model for s in first.stages] == [None, "lung_nodule_candidates_ct"]      # the first declares the pair
    assert second.training["first_stage"] == {"name": "lung_nodule_ct", "version": first.version,
                                              "weights_sha256": first.weights_sha256}
    command = f"dxgate train lung-nodule --config {config} --second-stage {root / SECOND_STAGE}"
    assert first.training["command"] == second.training["command"] == command
    assert second.training["config"] == str(root / SECOND_STAGE)
    assert first.training["second_stage"] == second.name
    assert second.training["steps_per_round"] == [20, 10]
    phases = second.training["timings_s"]          # the first stage's training is part of the command's time
    assert set(phases) == {"first_stage_s", "patches_1_s", "train_1_s", "patches_2_s", "train_2_s", "calibration_s",
                           "heldout_9000_s"}
    assert second.training["command_seconds"] == pytest.approx(sum(phases.values()), abs=len(phases))
    assert all("not for clinical use" in c.intended_use.lower() for c in (first, second))


def test_the_first_stage_gets_its_own_operating_point_and_figures_from_the_same_scans(
        lung_model: tuple[Path, Path]) -> None:
    root, _ = lung_model
    first = load_model(root / "models" / "lung_nodule_ct").card
    second = load_model(root / "models" / "lung_nodule_candidates_ct").card
    chosen = first.metrics["operating_point_selection"]
    assert first.thresholds.probability == chosen["probability"] >= 0.3
    assert chosen["calibration_scans"] == 2 and chosen["calibration_seeds"] == [6000, 6001]
    alone, pair = first.metrics["heldout"][0], second.metrics["heldout"][0]
    assert alone["seeds"] == pair["seeds"] == [9000, 9001] and alone["n_nodules"] == pair["n_nodules"]
    assert alone["operating_point"]["probability"] == first.thresholds.probability
    assert "candidate_union" not in alone and set(alone["seconds_per_case"]) == {"first_stage"}
    assert (root / "models" / "lung_nodule_ct" / alone["figure"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # from the pair's own scored cases (no CT scored twice), blobs left out
    from training.lung_model import without_blobs
    from training.scoring.served import SOURCE_FLOOR, served_curve

    scores = root / "run" / "second_stage" / "scores" / "test_9000"
    rows = [json.loads((scores / f"{seed}.json").read_text()) for seed in (9000, 9001)]
    entries = json.loads((root / "eval" / "datalist.json").read_text())["test"]
    curve = served_curve(without_blobs(rows), entries, SOURCE_FLOOR, limits=first.thresholds)
    assert alone["sensitivity_at_1fp_per_scan"] == curve.sensitivity_at(1.0) and alone["cpm"] == curve.cpm


def test_the_gateway_serves_the_pair_the_command_registered(lung_model: tuple[Path, Path]) -> None:
    from dicom_gateway.server import load_models
    from dicom_gateway.settings import Settings

    root, _ = lung_model
    loaded = load_models(Settings(models_dir=root / "models"))
    lung = loaded["lung_nodule_ct"].runner
    assert [s.card.name for s in lung.stages] == ["lung_nodule_candidates_ct"]


def test_the_command_resumes_a_finished_run_without_training_again(lung_model: tuple[Path, Path]) -> None:
    from training.workflow import train_model

    root, config = lung_model
    before = {n: load_model(root / "models" / n).card for n in ("lung_nodule_ct", "lung_nodule_candidates_ct")}
    out = train_model("lung-nodule", config, root / SECOND_STAGE)
    assert out["registered"] == [str(root / "models" / n) for n in before]
    for name, card in before.items():
        again = load_model(root / "models" / name).card
        assert again.weights_sha256 == card.weights_sha256 and again.thresholds == card.thresholds
    assert again.training["steps_per_round"] == [20, 10]


def test_a_second_stage_is_refused_before_training_where_it_does_not_belong(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from dxgate.main import main

    config, second = _configs(tmp_path)
    spine = tmp_path / "spine.yaml"
    spine.write_text(config.read_text().replace("task: lung-nodule", "task: spine-vertebrae"))
    for task, config_file in (("spine-vertebrae", spine), ("lung-nodule-candidates", second)):
        assert main(["train", task, "--config", str(config_file), "--second-stage", str(second)]) == 2
        assert "--second-stage goes with lung-nodule only" in capsys.readouterr().err
    from training.errors import TrainingError
    from training.workflow import train_model

    with pytest.raises(TrainingError, match="only the lung-nodule task has one"):   # called directly
        train_model("spine-vertebrae", spine, second)
    broken = tmp_path / "broken.yaml"
    broken.write_text(second.read_text().replace("rounds:", "roundz:"))
    assert main(["train", "lung-nodule", "--config", str(config), "--second-stage", str(broken)]) == 2
    assert f"cannot read {broken}" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
