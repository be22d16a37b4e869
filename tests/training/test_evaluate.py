"""Scoring and report writing of `dxgate evaluate` with synthetic predictions."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest

from training.evaluate import resolve_dataset, series_files
from training.loaders import LoaderError
from training.scoring.findings import score_nodules, score_vertebrae, write_report


@dataclass
class F:
    """The Finding fields evaluate reads."""

    label: str
    centre_mm: tuple[float, float, float]
    probability: float


def test_score_nodules_both_truth_forms_and_report(tmp_path):
    entries = [{"nodules": [[0, 0, 0, 10.0]], "excluded": [[40, 0, 0, 6.0]]},
               {"nodules": [{"centre_mm": [5, 5, 5], "diameter_mm": 8.0}]}]
    findings = [[F("Nodule", (1, 0, 0), 0.9), F("Nodule", (40, 1, 0), 0.95), F("Nodule", (90, 0, 0), 0.4)],
                [F("Nodule", (5, 5, 6), 0.3)]]
    metrics, froc = score_nodules(findings, entries)
    assert froc.n_ignored == 1 and froc.n_false_positives == 1 and froc.n_true_positives == 2
    # curve (0,0) (0,.5)@0.9 (.5,.5)@0.4 (.5,1)@0.3 -> sens 0.5 below 0.5 FP/scan, 1 from there on
    assert metrics["cpm"] == pytest.approx((0.5 * 2 + 1 * 5) / 7)
    report = write_report({"model": {"name": "m"}, "metrics": metrics}, tmp_path / "out", froc=froc)
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert saved["metrics"]["cpm"] == pytest.approx(metrics["cpm"])
    assert report["figures"] == [str(tmp_path / "out" / "froc.png")]
    assert (tmp_path / "out" / "froc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError):
        score_nodules(findings[:1], entries)


def test_score_vertebrae_labels_names_and_duplicates(tmp_path):
    entries = [{"centroids": [[20, 0, 0, 0], [21, 0, 0, 30], [26, 0, 0, 60]]},             # VerSe ints
               {"vertebrae": [{"label": "19", "index": 19, "centroid_mm": [0, 0, 0]}]}]    # synthetic form
    findings = [[F("L1", (0, 0, 3), 0.9), F("L2", (0, 0, 31), 0.8), F("L2", (0, 0, 0), 0.2),
                 F("S", (0, 0, 90), 0.9)],
                [F("T11", (0, 0, 1), 0.9)]]
    metrics, errors = score_vertebrae(findings, entries)
    # case 1: L1 hit (3 mm), L2 hit (1 mm; the 0.2 duplicate is dropped), S 30 mm -> miss; case 2: T12 missed
    assert metrics["per_case"][0]["id_rate"] == pytest.approx(2 / 3) and metrics["per_case"][1]["id_rate"] == 0
    assert metrics["id_rate"] == pytest.approx(1 / 3) and metrics["id_rate_pooled"] == pytest.approx(2 / 4)
    assert errors == {"L1": [3.0], "L2": [1.0], "S": [30.0]}
    report = write_report({"metrics": metrics}, tmp_path, errors=errors, threshold_mm=20.0)
    assert report["figures"] == [str(tmp_path / "localisation_errors.png")]
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["metrics"]["per_case"][1]["mean_error_mm"] is None                       # NaN -> null


def test_dataset_and_series_resolution(tmp_path):
    with pytest.raises(LoaderError):
        resolve_dataset(tmp_path)
    (tmp_path / "datalist.json").write_text("{}")
    assert resolve_dataset(tmp_path) == tmp_path / "datalist.json"
    series = tmp_path / "s"
    series.mkdir()
    (series / "b.dcm").write_bytes(b"x")
    (series / "a.dcm").write_bytes(b"x")
    (series / "notes.json").write_text("{}")
    assert [p.name for p in series_files(series)] == ["a.dcm", "b.dcm"]
    with pytest.raises(LoaderError, match="does not exist"):
        series_files(tmp_path / "missing")


def _write_folder(folder, card: dict) -> None:
    """metadata.json and a Triton config.pbtxt beside the folder's 1/model.onnx."""
    (folder / "metadata.json").write_text(json.dumps(card))
    (folder / "config.pbtxt").write_text(
        f'name: "{folder.name}"\nplatform: "onnxruntime_onnx"\nmax_batch_size: 0\n'
        'input [ { name: "image" data_type: TYPE_FP32 dims: [ -1, 1, -1, -1, -1 ] } ]\n'
        'output [ { name: "logits" data_type: TYPE_FP32 dims: [ -1, 1, -1, -1, -1 ] } ]\n')


def _threshold_model(folder):
    """A registered nodule model whose ONNX graph is logits = 40 * (image - 0.45): bright spheres light up."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    from inference.model_repo import sha256_file

    (folder / "1").mkdir(parents=True)
    dims = ["B", 1, "Z", "Y", "X"]
    graph = helper.make_graph(
        [helper.make_node("Sub", ["image", "c"], ["d"]), helper.make_node("Mul", ["d", "k"], ["logits"])],
        "threshold", [helper.make_tensor_value_info("image", TensorProto.FLOAT, dims)],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, dims)],
        [helper.make_tensor("c", TensorProto.FLOAT, [], [0.45]),
         helper.make_tensor("k", TensorProto.FLOAT, [], [40.0])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(folder / "1" / "model.onnx"))
    sct = "SCT"
    card = {
        "name": folder.name, "version": "1", "task": "lung-nodule-detection", "description": "test threshold",
        "modality": ["CT"], "body_part": ["CHEST"], "postprocess": "nodules",
        "input": {"name": "image", "spacing_mm": [2.0, 2.0, 2.0], "window": [-1000.0, 400.0],
                  "roi_size": [16, 16, 16], "overlap": 0.25, "batch_size": 2},
        "output": {"name": "logits", "activation": "sigmoid", "channels": 1},
        "labels": [{"index": 1, "name": "Lung nodule",
                    "finding": {"value": "27925004", "scheme": sct, "meaning": "Nodule"},
                    "category": {"value": "49755003", "scheme": sct, "meaning": "Morphologically abnormal structure"},
                    "site": {"value": "39607008", "scheme": sct, "meaning": "Lung"}}],
        "thresholds": {"probability": 0.5, "min_diameter_mm": 3.0},
        "series": {"modalities": ["CT"], "min_slices": 2},
        "weights_sha256": sha256_file(folder / "1" / "model.onnx"),
    }
    _write_folder(folder, card)


def test_evaluate_command_end_to_end(tmp_path):
    """DICOM series -> ModelRunner (ONNX Runtime) -> FROC/CPM report, one case failing cleanly."""
    conftest = pytest.importorskip("tests.inference.conftest")
    from training.evaluate import evaluate_command
    from training.loaders import write_datalist

    _threshold_model(tmp_path / "models" / "threshold_nodule")
    data = tmp_path / "data"
    conftest.write_series(data / "hit", sphere_mm=(-6.0, 3.0, 118.0), radius_mm=6.0)
    conftest.write_series(data / "empty", sphere_mm=None, seed=1)
    entries = [{"id": "hit", "image": "hit", "nodules": [[-6.0, 3.0, 118.0, 12.0]]},
               {"id": "empty", "image": "empty", "nodules": [[0.0, 0.0, 120.0, 8.0]]},
               {"id": "broken", "image": "missing", "nodules": []}]
    (data / "missing").mkdir()
    datalist = write_datalist(entries, data / "datalist.json", "e2e", splits={"test": ["hit", "empty", "broken"]})
    report = evaluate_command("threshold_nodule", datalist, tmp_path / "out", models_dir=tmp_path / "models")
    m = report["metrics"]
    assert report["dataset"]["split"] == "test" and report["dataset"]["n_cases"] == 3
    assert [f["case"] for f in report["failed"]] == ["broken"]
    assert (m["n_nodules"], m["true_positives"], m["false_positives"]) == (2, 1, 0)
    assert m["cpm"] == pytest.approx(0.5)
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["model"]["name"] == "threshold_nodule"
    assert (tmp_path / "out" / "froc.png").is_file()


def _brightness_second_stage(folder, first: str, gain: float) -> None:
    """A registered second stage of `first` whose classifier's logit is `gain` x the patch's mean intensity (in
    [0, 1]): a lung patch (about 0.1) scores sigmoid(0.1 gain), every patch differently (LUNA16 keeps only the
    100 most probable marks of a scan, strictly above the 101st, so tied scores would all be dropped)."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    from inference.model_repo import sha256_file

    (folder / "1").mkdir(parents=True)
    dims = ["B", 1, "Z", "Y", "X"]
    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["image"], ["m"], axes=[2, 3, 4], keepdims=1),
         helper.make_node("Mul", ["m", "k"], ["logits"])],
        "brightness", [helper.make_tensor_value_info("image", TensorProto.FLOAT, dims)],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["B", 1, 1, 1, 1])],
        [helper.make_tensor("k", TensorProto.FLOAT, [], [gain])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(folder / "1" / "model.onnx"))
    first_card = json.loads((folder.parent / first / "metadata.json").read_text())
    card = {
        "name": folder.name, "version": "1", "task": "lung-nodule-candidate-classification",
        "description": "test: scores by brightness", "modality": ["CT"], "body_part": ["CHEST"],
        "postprocess": "candidates",
        "input": {"name": "image", "spacing_mm": [1.0, 1.0, 1.0], "window": [-1000.0, 400.0],
                  "roi_size": [24, 24, 24], "overlap": 0.0, "batch_size": 64},
        "output": {"name": "logits", "activation": "sigmoid", "channels": 1},
        "labels": first_card["labels"], "thresholds": {"probability": 0.5}, "series": first_card["series"],
        "weights_sha256": sha256_file(folder / "1" / "model.onnx"),
    }
    _write_folder(folder, card)
    from training.register import declare_candidate_stage

    declare_candidate_stage(folder.parent / first, folder.name, None, first_card["thresholds"]["probability"])


def test_evaluate_runs_the_lung_model_with_its_second_stage_as_the_gateway_does(tmp_path):
    """The second stage installed beside the model is run (and named in the report) unless first_stage_only."""
    import shutil
    from pathlib import Path

    from training.evaluate import evaluate_command
    from training.loaders import write_datalist
    from training.synthetic import write_chest_ct_study

    models = tmp_path / "models"
    shutil.copytree(Path(__file__).resolve().parents[2] / "models" / "lung_nodule_ct", models / "lung_nodule_ct")
    _brightness_second_stage(models / "every_blob", "lung_nodule_ct", 10.0)   # p >= 0.5 for every patch
    study = write_chest_ct_study(tmp_path / "data" / "ct", seed=11, slices=60, nodules=2, rows=128)
    nodules = [[*n.centre_mm, n.diameter_mm] for n in study.volume.nodules]
    datalist = write_datalist([{"id": "ct", "image": "ct", "nodules": nodules}], tmp_path / "data" / "datalist.json",
                              "e2e", splits={"test": ["ct"]})
    both = evaluate_command("lung_nodule_ct", datalist, tmp_path / "both", models_dir=models)
    alone = evaluate_command("lung_nodule_ct", datalist, tmp_path / "alone", models_dir=models, first_stage_only=True)
    assert both["failed"] == [] and alone["failed"] == []
    assert both["model"]["second_stage"]["name"] == "every_blob" and alone["model"]["second_stage"] is None
    assert alone["command"].endswith("--first-stage-only")
    assert both["metrics"]["false_positives"] > alone["metrics"]["false_positives"] + 10, "every blob was added"
    assert both["metrics"]["true_positives"] >= alone["metrics"]["true_positives"]
    with pytest.raises(LoaderError, match="evaluate lung_nodule_ct"):
        evaluate_command("every_blob", datalist, tmp_path / "x", models_dir=models)


def test_evaluate_reads_a_generated_manifest(tmp_path):
    """`dxgate evaluate` on what `training.datasets.generate_dataset` writes (NIfTI + spacing/origin entries)."""
    from training.datasets import DATALIST, generate_dataset
    from training.evaluate import evaluate_command

    _threshold_model(tmp_path / "models" / "threshold_nodule")
    entries = generate_dataset("lung-nodule", tmp_path / "gen", "test", 2, 9000, rows=96, slices=40, progress=False)
    report = evaluate_command("threshold_nodule", tmp_path / "gen" / DATALIST, tmp_path / "out",
                              models_dir=tmp_path / "models")
    assert report["failed"] == [] and report["dataset"]["n_cases"] == 2
    assert report["metrics"]["n_nodules"] == sum(len(e["nodules"]) for e in entries) > 0
    assert report["metrics"]["true_positives"] + report["metrics"]["false_positives"] > 0, "findings were scored"
