"""route_study (pure) and `dxgate rules test` over a folder of DICOM files."""

from __future__ import annotations

import io
from pathlib import Path

from dicom_gateway.route.routing import route_study
from dicom_gateway.route.series import SeriesSummary
from dicom_gateway.settings import Range, Rule, RuleMatch, Settings
from dxgate.rules import rules_test_command
from harness.ct import write_ct_series
from inference.model_card import ModelCard
from inference.model_repo import RegisteredModel

DESTS = ["pacs", "archive"]


def model(name: str, modalities: list[str], orientation: list[str], min_slices: int = 16) -> RegisteredModel:
    card = ModelCard.model_validate({
        "name": name, "version": "2.1.0", "task": "lung-nodule-detection", "description": "test",
        "modality": modalities, "body_part": ["CHEST"], "postprocess": "nodules",
        "input": {"spacing_mm": [1, 1, 1], "window": [-1000, 400], "roi_size": [32, 32, 32]},
        "output": {"channels": 1}, "labels": [], "weights_sha256": "0" * 64,
        "series": {"modalities": modalities, "orientation": orientation, "min_slices": min_slices}})
    folder = Path("/models") / name
    return RegisteredModel(card=card, folder=folder, weights_path=folder / "2.1.0" / "model.onnx")


MODELS = {"lung": model("lung", ["CT"], ["axial"]), "spine": model("spine", ["CT"], ["sagittal", "axial"])}


def series(uid: str, modality: str = "CT", body_part: str = "CHEST", orientation: str = "axial",
           thickness: float = 1.0, n: int = 100, number: int = 1) -> SeriesSummary:
    return SeriesSummary(series_uid=uid, modality=modality, body_part=body_part, series_description="",
                         series_number=number, slice_thickness=thickness, orientation=orientation, n_instances=n,
                         calling_ae="PACS", sop_instance_uids=tuple(f"{uid}.{i}" for i in range(n)), paths=())


CHEST_RULE = Rule(name="chest-ct-nodules", match=RuleMatch(modality=["CT"], body_part=["CHEST"]), models=["lung"],
                  destinations=["pacs"])


def test_routes_matching_study() -> None:
    study = [series("1.1", thickness=5.0, number=1), series("1.2", thickness=1.0, number=2),
             series("1.3", orientation="coronal", thickness=0.5, number=3)]
    decisions, reasons = route_study([CHEST_RULE], MODELS, study, DESTS)
    assert reasons == []
    (d,) = decisions
    assert (d.model, d.model_version, d.series.series_uid, d.destinations, d.rule) == (
        "lung", "2.1.0", "1.2", ["pacs"], "chest-ct-nodules")


def test_selection_only_among_series_that_matched_the_rule() -> None:
    rule = Rule(name="thick", match=RuleMatch(slice_thickness=Range(min=3)), models=["lung"])
    study = [series("1.1", thickness=5.0), series("1.2", thickness=1.0)]
    (d,), _ = route_study([rule], MODELS, study, DESTS)
    assert d.series.series_uid == "1.1"
    assert d.destinations == DESTS  # no destinations on the rule = all


def test_no_rule_matches_gives_reason_per_rule() -> None:
    spine_rule = Rule(name="spine", match=RuleMatch(body_part=["SPINE"]), models=["spine"])
    decisions, reasons = route_study([CHEST_RULE, spine_rule], MODELS, [series("2.1", modality="MR")], DESTS)
    assert decisions == []
    assert reasons == ["rule chest-ct-nodules: modality MR not in [CT]", "rule spine: body part CHEST not in [SPINE]"]


def test_reasons_name_series_when_they_differ() -> None:
    study = [series("3.1", modality="MR", number=1), series("3.2", body_part="HEAD", number=2)]
    _, reasons = route_study([CHEST_RULE], MODELS, study, DESTS)
    assert reasons == ["rule chest-ct-nodules: modality MR not in [CT] (series #1 3.1);"
                       " body part HEAD not in [CHEST] (series #2 3.2)"]


def test_no_rules_or_no_series() -> None:
    assert route_study([], MODELS, [series("4.1")], DESTS) == ([], ["no routing rule configured"])
    assert route_study([CHEST_RULE], MODELS, [], DESTS) == ([], ["rule chest-ct-nodules: the study has no series"])


def test_model_not_installed() -> None:
    rule = Rule(name="r", models=["lung", "liver"])
    decisions, reasons = route_study([rule], MODELS, [series("5.1")], DESTS)
    assert [d.model for d in decisions] == ["lung"]
    assert reasons == ["rule r: model liver not installed"]


def test_no_usable_series_for_model() -> None:
    rule = Rule(name="r", models=["lung"])
    decisions, reasons = route_study([rule], MODELS, [series("6.1", orientation="sagittal", number=4)], DESTS)
    assert decisions == []
    assert reasons == ["rule r: model lung: no axial CT series with ≥ 16 slices; found: #4 6.1 (CT, sagittal,"
                       " 1 mm, 100 images)"]


def test_two_rules_same_model_one_decision() -> None:
    second = Rule(name="all-ct", match=RuleMatch(modality=["ct"]), models=["lung", "spine"], destinations=["archive"])
    decisions, reasons = route_study([CHEST_RULE, second], MODELS, [series("7.1")], DESTS)
    assert reasons == []
    by_model = {d.model: d for d in decisions}
    assert set(by_model) == {"lung", "spine"}
    assert by_model["lung"].destinations == ["pacs", "archive"]
    assert by_model["lung"].rule == "chest-ct-nodules, all-ct"
    assert by_model["spine"].destinations == ["archive"]


def test_no_destinations_at_all() -> None:
    decisions, reasons = route_study([Rule(name="r", models=["lung"])], MODELS, [series("8.1")], [])
    assert [d.model for d in decisions] == ["lung"] and decisions[0].destinations == []
    assert reasons == ["rule r: no destinations configured; results kept in the outbox"]


def _settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path / "var", models_dir=tmp_path / "models", rules=[CHEST_RULE],
                    destinations=[{"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": 4242}])


def test_rules_test_command_routes(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    write_ct_series(folder, 16)
    out = io.StringIO()
    assert rules_test_command(folder, _settings(tmp_path), models=MODELS, out=out) == 0
    text = out.getvalue()
    assert "chest-ct-nodules" in text and "lung 2.1.0 reads series" in text and "-> pacs" in text


def test_rules_test_command_explains_nothing_routes(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    write_ct_series(folder, 2, modality="MR")
    out = io.StringIO()
    # models_dir does not exist: discover_models finds none
    assert rules_test_command(folder, _settings(tmp_path), out=out) == 1
    text = out.getvalue()
    assert "nothing routes:" in text and "rule chest-ct-nodules: modality MR not in [CT]" in text
    assert rules_test_command(tmp_path / "missing", _settings(tmp_path), out=io.StringIO()) == 1
