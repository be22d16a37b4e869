"""`dxgate train lung-nodule-candidates` on tiny data: trains, calibrates, registers, and the gateway serves it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from inference.model_repo import load_model
from tests.training.shipped import tiny_second_stage

SHIPPED_LUNG = Path(__file__).resolve().parents[2] / "models" / "lung_nodule_ct"


@pytest.fixture(scope="module")
def second_stage(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A models/ folder holding the shipped lung model and a second stage trained a few seconds on tiny CTs by a
    tiny variant of the shipped config (its flips, flip screen, confidence; two short rounds, the second with a
    budget of minutes)."""
    import shutil

    from training.second_stage import load_config, run

    root = tmp_path_factory.mktemp("second_stage")
    models = root / "models"
    shutil.copytree(SHIPPED_LUNG, models / "lung_nodule_ct")
    config = tiny_second_stage(root, [{"seeds": [3000, 3003], "steps": 30, "painted": 0},
                                      {"seeds": [3003, 3006], "minutes": 0.05, "painted": 4}],
                               first_stage=str(models / "lung_nodule_ct"), run_dir=str(root / "run"),
                               register_to=str(models))
    out = run(load_config(config), config, log=lambda s: None)
    assert out["registered"] == str(models / "lung_nodule_candidates_ct")
    return models


def test_the_command_registers_a_second_stage_naming_its_first(second_stage: Path) -> None:
    model = load_model(second_stage / "lung_nodule_candidates_ct")
    card = model.card
    first = load_model(second_stage / "lung_nodule_ct").card       # declares the composition
    assert card.postprocess == "candidates" and not card.runs_alone
    assert [(s.kind, s.model) for s in first.stages] == [("segmentation", None),
                                                         ("candidate_classification", "lung_nodule_candidates_ct")]
    assert 0.3 <= card.thresholds.probability < 1
    assert first.stages[0].probability == first.stages[1].probability == card.thresholds.probability
    # two calibration scans cannot bound the rate under 1 FP/scan with 90 % confidence even with none: budget 0
    op = card.metrics["operating_point"]
    assert op["confidence"] == 0.9 and op["calibration_fp_budget"] == 0 and op["calibration_fp_per_scan"] == 0
    assert "not for clinical use" in card.intended_use.lower()
    held = card.metrics["heldout"][0]
    assert held["cases"] == 2 and 0 <= held["sensitivity_at_1fp_per_scan"] <= 1
    assert (second_stage / "lung_nodule_candidates_ct" / held["figure"]).is_file()
    assert card.training["command"].startswith("dxgate train lung-nodule-candidates --config ")
    assert card.training["onnx_parity_max_abs_diff"] <= 1e-4
    assert card.training["rounds"][1]["hard"] is True and card.training["rounds"][1]["painted"] == 4
    steps = card.training["steps_per_round"]          # round 1 has a budget of steps, round 2 of minutes
    assert steps[0] == 30 and steps[1] >= 1
    assert card.training["rounds"][0]["steps"] == 30 and card.training["rounds"][1]["minutes"] == 0.05
    phases = card.training["timings_s"]                # every phase's time, kept across resumed invocations
    assert set(phases) == {"patches_1_s", "train_1_s", "patches_2_s", "train_2_s", "calibration_s", "heldout_9000_s"}
    assert card.training["command_seconds"] == pytest.approx(sum(phases.values()), abs=len(phases))
    assert card.training["nodules_per_ct"] == [8, 8] and card.training["measured_on"]["cores"] >= 1


def test_a_painting_round_turns_negatives_into_positives(second_stage: Path) -> None:
    """Round 2 of the fixture paints up to 4 nodules into each batch's negatives; round 1 paints none."""
    run = second_stage.parent / "run"
    first, second = (json.loads((run / f"classifier_{k}.json").read_text()) for k in (1, 2))
    assert first["painted"] == 0
    assert 1 <= second["painted"] <= 4 * second["steps"]


def test_phase_times_survive_a_resumed_invocation(tmp_path: Path) -> None:
    from training.run_timings import PhaseTimes

    first = PhaseTimes(tmp_path / "timings.json")
    with first.phase("patches_1_s"):
        pass
    with pytest.raises(KeyboardInterrupt), first.phase("train_1_s"):
        raise KeyboardInterrupt                        # interrupted part-way: adds nothing
    again = PhaseTimes(tmp_path / "timings.json")
    assert set(dict(again.items())) == {"patches_1_s"}
    with again.phase("patches_1_s"):                   # a resumed phase adds to what the first invocation took
        pass
    assert again.total() >= first.total() and set(dict(again.items())) == {"patches_1_s"}


def test_the_gateway_runs_the_second_stage_with_the_lung_model(second_stage: Path, tmp_path: Path) -> None:
    from dicom_gateway.server import load_models
    from dicom_gateway.settings import Settings
    from training.synthetic import write_chest_ct_study

    study = write_chest_ct_study(tmp_path / "ct", seed=11, slices=60, nodules=3, rows=128)
    loaded = load_models(Settings(models_dir=second_stage))
    lung = loaded["lung_nodule_ct"].runner
    (stage,) = lung.stages
    assert stage.card.name == "lung_nodule_candidates_ct"
    result = lung.run(sorted((tmp_path / "ct").glob("*.dcm")))
    assert result.model_version == "1+lung_nodule_candidates_ct.1"
    assert [a.name for a in result.algorithms] == ["lung_nodule_ct", "lung_nodule_candidates_ct"]
    assert result.algorithms[1] == stage.algorithm                   # named in the SR and SEG
    assert all(f.algorithm in result.algorithms for f in result.findings)
    assert result.label_map.shape[0] == 60
    threshold = stage.card.thresholds.probability
    assert lung.card.thresholds.probability == threshold, "the first stage runs at the combined threshold"
    for f in result.findings:
        assert f.diameter_mm is not None and f.diameter_mm > 0 and f.probability >= threshold - 1e-6
    assert np.count_nonzero(result.label_map) > 0 or not result.findings
    assert study.volume.nodules


def test_a_rule_naming_the_second_stage_routes_nothing_and_says_why(second_stage: Path) -> None:
    from dicom_gateway.route.routing import route_study
    from dicom_gateway.route.series import SeriesSummary
    from dicom_gateway.settings import Rule, RuleMatch
    from inference.model_repo import discover_models

    models = discover_models(second_stage)
    series = SeriesSummary(series_uid="2.25.7", modality="CT", body_part="CHEST", series_description="",
                           series_number=1, slice_thickness=1.0, orientation="axial", n_instances=80,
                           calling_ae="PACS", sop_instance_uids=tuple(f"2.25.7.{i}" for i in range(80)), paths=())
    rule = Rule(name="chest", match=RuleMatch(modality=["CT"]), models=["lung_nodule_candidates_ct", "lung_nodule_ct"])
    decisions, reasons = route_study([rule], models, [series], ["pacs"])
    assert [d.model for d in decisions] == ["lung_nodule_ct"]
    assert any("runs only as a stage of lung_nodule_ct" in r for r in reasons)
