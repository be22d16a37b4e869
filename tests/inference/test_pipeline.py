"""End to end: tiny DICOM CT series -> ModelRunner (ONNX Runtime, trained net) -> findings + label map."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from inference.backends.factory import make_backend
from inference.errors import BackendError, InferenceError, VolumeError, WrongModalityError
from inference.pipeline import STAGES, ModelRunner
from inference.volume import load_series

SPHERE_MM = (-6.0, 3.0, 118.0)


@pytest.fixture(scope="module")
def runner(nodule_model):
    backend = make_backend(nodule_model, "onnxruntime", intra_op_threads=2)
    yield ModelRunner(nodule_model, backend)
    backend.close()


def test_finds_the_sphere_on_the_source_grid(runner, series_writer):
    paths = series_writer("ct", sphere_mm=SPHERE_MM, radius_mm=6.0)
    result = runner.run(paths)

    assert set(result.stage_seconds) == set(STAGES) == {"load", "preprocess", "infer", "postprocess"}
    assert all(v >= 0 for v in result.stage_seconds.values())
    assert len(result.findings) == 1
    f = result.findings[0]
    # within about a voxel (source spacing 2.0 / 1.5 / 1.5 mm) of the true centre, in patient mm
    assert np.linalg.norm(np.subtract(f.centre_mm, SPHERE_MM)) < 2.5
    true_volume = 4 / 3 * np.pi * 6.0**3
    assert 0.5 * true_volume < f.volume_mm3 < 1.6 * true_volume
    assert f.diameter_mm == pytest.approx((6 * f.volume_mm3 / np.pi) ** (1 / 3))
    assert 0.5 < f.probability <= 1.0
    assert f.label_index == 1 and f.finding_code.value == "27925004" and f.site_code.value == "39607008"
    assert f.tracking_uid and f.referenced_sop_instance_uid in result.source_sop_instance_uids

    volume = load_series(paths)
    assert result.label_map.shape == volume.voxels.shape  # the SOURCE grid, not the 2 mm model grid
    assert result.source_sop_instance_uids == volume.sop_instance_uids
    assert set(np.unique(result.label_map)) == {0, 1}
    sphere = volume.voxels > 0
    dice = 2 * np.sum(sphere & (result.label_map == 1)) / (sphere.sum() + (result.label_map == 1).sum())
    assert dice > 0.7
    # the referenced slice is the one nearest the centre along the normal
    z_idx = int(round(volume.patient_to_index(np.array(f.centre_mm))[0]))
    assert f.referenced_sop_instance_uid == volume.sop_instance_uids[z_idx]
    assert result.model_name == "tiny_nodule" and result.model_version == "1"
    assert result.weights_sha256 == runner.model.card.weights_sha256


def test_empty_series_has_no_findings(runner, series_writer):
    result = runner.run(series_writer("empty", sphere_mm=None))
    assert result.findings == [] and not result.label_map.any()


def test_wrong_modality_is_a_load_error(runner, series_writer):
    with pytest.raises(WrongModalityError) as info:
        runner.run(series_writer("mr", modality="MR"))
    assert info.value.stage == "load"


def test_missing_slice_is_a_load_error(runner, series_writer):
    with pytest.raises(VolumeError, match="irregular slice spacing") as info:
        runner.run(series_writer("gap", skip=[7]))
    assert info.value.stage == "load"


class _BrokenBackend:
    name = "broken"

    def infer(self, inputs):
        raise RuntimeError("device lost")

    def close(self) -> None:
        pass


def test_backend_failure_is_an_infer_error_with_cause(nodule_model, series_writer):
    with pytest.raises(BackendError) as info:
        ModelRunner(nodule_model, _BrokenBackend()).run(series_writer("ct"))
    assert info.value.stage == "infer"
    assert isinstance(info.value, InferenceError)
    assert isinstance(info.value.__cause__, RuntimeError)


def test_inference_package_imports_no_training_stack():
    code = (
        "import sys, inference.pipeline, inference.backends.factory, inference.backends.torch_backend, "
        "inference.backends.onnxruntime_backend, inference.postprocess\n"
        "bad = [m for m in ('torch', 'monai', 'dicom_gateway', 'training') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
