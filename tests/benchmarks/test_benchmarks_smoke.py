"""Each benchmark runs at --tiny size and writes its JSON, Markdown and PNG (no thresholds: not a test of speed)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from benchmarks.__main__ import main
from harness.system import system_tool

pytestmark = pytest.mark.integration
MACHINE_KEYS = {"cpu_model", "cpu_cores", "ram_gib", "gpus", "versions"}


def _run(name: str, out: Path, *extra: str) -> dict:
    assert main([name, "--tiny", "--out", str(out), *extra]) == 0
    data = json.loads((out / f"{name}.json").read_text())
    assert {"benchmark", "created", "machine", "settings", "results", "summary"} <= set(data)
    assert set(data["machine"]) >= MACHINE_KEYS
    assert {"python", "onnxruntime", "pydicom", "pynetdicom", "dcmtk"} <= set(data["machine"]["versions"])
    assert (out / f"{name}.md").read_text().startswith("# ")
    pngs = list(out.glob(f"{name}_*.png"))
    assert pngs and all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    return data


def _need_dcmtk() -> None:
    """Skips the test (ToolMissing, see tests/conftest.py) where dcmtk is not installed."""
    for tool in ("storescu", "storescp", "echoscu"):
        system_tool(tool)


def test_inference_tiny(tmp_path: Path) -> None:
    data = _run("inference", tmp_path)
    assert {"volume_shape_zyx", "roi_zyx", "overlap", "batch", "threads"} <= set(data["settings"])
    rows = {r["backend"]: r for r in data["results"]}
    assert "latency_s" in rows["ort-cpu"], rows["ort-cpu"]
    for row in rows.values():
        if "latency_s" in row:
            assert {"p50", "p95", "p99"} <= set(row["latency_s"])
            assert row["max_abs_diff_vs_ort_cpu"] <= 1e-3


def test_ingest_tiny(tmp_path: Path) -> None:
    _need_dcmtk()
    data = _run("ingest", tmp_path, "--fsync", "off")
    assert {"TCP_NODELAY_dcmtk", "max_pdu_storescu", "fsync_dxgate", "slices"} <= set(data["settings"])
    targets = {r["target"] for r in data["results"] if "images_per_s" in r}
    assert {"storescp", "storescp --fork"} <= targets
    if not data["summary"]["dxgate_available"]:
        pytest.skip("dxgate serve could not start: " + next(r["error"] for r in data["results"] if "error" in r))
    for row in data["results"]:
        assert row.get("errors") == [] and row["images_per_s"] > 0 and row["ratio_vs_storescp"] is not None


def test_e2e_tiny(tmp_path: Path) -> None:
    _need_dcmtk()
    if shutil.which("dciodvfy") is None:
        pytest.skip("dicom3tools (dciodvfy) is needed by the gateway's validation stage")
    data = _run("e2e", tmp_path, "--timeout", "180", "--backend", "onnxruntime", "triton")
    if "onnxruntime" in data.get("unavailable", {}):
        pytest.skip("dxgate serve could not start: " + data["unavailable"]["onnxruntime"][:500])
    assert not data.get("errors"), data.get("errors")
    assert {"quiet_seconds", "fsync", "senders", "slices"} <= set(data["settings"])
    groups = {v["backend"]: v for v in data["summary"].values() if isinstance(v, dict)}
    for group in groups.values():
        assert group["done"] == group["studies"] == 2
        assert {"p50", "p95", "p99"} <= set(group["latency_s"]) and group["latency_s"]["n"] == 2
        assert group["peak_rss_mb"] and group["peak_rss_mb"] > 0
    assert all(r["stage_seconds"].get("infer") is not None for r in data["results"])
    if "triton" in data.get("unavailable", {}):
        pytest.skip("Triton server unavailable: " + data["unavailable"]["triton"][:500])
    assert groups["triton"]["p50_vs_onnxruntime"] > 0   # the same studies through a real Triton server


def test_memory_tiny(tmp_path: Path) -> None:
    if shutil.which("dciodvfy") is None:
        pytest.skip("dicom3tools (dciodvfy) is needed by the validation stage")
    data = _run("memory", tmp_path)
    (row,) = data["results"]
    assert row["slices"] == 16 and row["voxel_mib"] > 0
    assert set(row["stages"]) == {"load", "preprocess", "infer", "postprocess", "headers", "encode_seg",
                                  "encode_sr", "encode_gsps", "validate"}
    assert row["peak_mib"] >= row["baseline_mib"] > 0 and row["job_peak_x_voxels"] >= 0


def test_training_tiny(tmp_path: Path) -> None:
    data = _run("training", tmp_path)
    assert {"steps", "warmup", "cases", "models"} <= set(data["settings"])
    rows = {r["model"]: r for r in data["results"]}
    assert set(rows) == {"lung_nodule_ct", "spine_vertebrae_ct", "lung_nodule_candidates_ct"}
    for row in rows.values():
        assert row["steps"] == 6 and row["steps_timed"] == 4 and row["steps_per_s"] > 0
        assert row["projected_shipped_loop_min"] == pytest.approx(row["shipped_steps"] / row["steps_per_s"] / 60)
        assert row["precision"] in {"float32", "bfloat16 autocast", "amp float16"}
    assert rows["lung_nodule_ct"]["shipped_steps"] == 20000      # the shipped configs', not the benchmark's
    assert rows["lung_nodule_candidates_ct"]["shipped_steps"] == 6600 + 5100 + 4900
    assert (tmp_path / "runs" / "lung_nodule_ct" / "log.csv").is_file()


def test_training_rate_reads_the_log(tmp_path: Path) -> None:
    from benchmarks.training_bench import steady_rate

    log = tmp_path / "log.csv"
    log.write_text("step,loss,lr,val_dice,seconds\n" + "".join(f"{s},0.5,0.001,,{10 + 0.5 * s}\n"
                                                              for s in range(1, 11)) + "11,0.5,0.001,0.3,99\n")
    rate = steady_rate(log, 2)   # steps 2..10 at 0.5 s a step; step 11 validates and is left out
    assert rate == {"steps_timed": 8, "seconds_timed": 4.0, "steps_per_s": 2.0, "first_step_s": 10.5}
    with pytest.raises(ValueError, match="need more than"):
        steady_rate(log, 9)
    log.write_text("step,loss,lr,val_dice,seconds\n" + "".join(f"{s},0.5,0.001,,1.000\n" for s in range(1, 6)))
    with pytest.raises(ValueError, match="no measurable time"):
        steady_rate(log, 1)
