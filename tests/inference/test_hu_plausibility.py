"""A CT model refuses pixels that are not Hounsfield units of a body (MR labelled CT, a lost rescale); real-looking
chest and spine CTs pass."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import CTImageStorage

from harness.ct import ct_slices
from inference.plausibility import CT_LOW_HU, ImplausibleCTError, check_ct_values
from inference.volume import load_series
from training.synthetic.chest_ct import generate_chest_ct
from training.synthetic.spine_ct import generate_spine_ct


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("generate", [generate_chest_ct, generate_spine_ct], ids=["chest", "spine"])
def test_synthetic_chest_and_spine_ct_are_plausible(generate, seed) -> None:  # noqa: ANN001
    check_ct_values(generate(seed, slices=32, rows=128).hu)


def _write(datasets: list[pydicom.Dataset], folder: Path) -> list[Path]:
    folder.mkdir(parents=True)
    paths = [folder / f"{k}.dcm" for k in range(len(datasets))]
    for ds, path in zip(datasets, paths, strict=True):
        ds.save_as(path, enforce_file_format=True)
    return paths


def _mr_signal(shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    """MR-like magnitude: about 0 outside the body (noise), 300-1200 inside; never negative."""
    rng = np.random.default_rng(seed)
    nz, ny, nx = shape
    _, yy, xx = np.mgrid[0:nz, 0:ny, 0:nx]
    body = ((yy - ny / 2) / (0.42 * ny)) ** 2 + ((xx - nx / 2) / (0.38 * nx)) ** 2 <= 1
    signal = np.abs(rng.normal(0, 6, shape))
    signal[body] = rng.uniform(300, 1200, int(body.sum()))
    return np.round(signal).astype(np.float32)


def _mr_labelled_ct(folder: Path) -> list[Path]:
    datasets = ct_slices(_mr_signal((24, 64, 64)), spacing=(2.0, 1.5, 1.5), origin=(-48.0, -48.0, 0.0),
                         modality="MR")
    for ds in datasets:   # the sender relabels it: Modality and SOP Class say CT, the pixels are MR signal
        ds.Modality = "CT"
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    return _write(datasets, folder)


def _runner(nodule_model):  # noqa: ANN001, ANN202
    from inference.backends.onnxruntime_backend import OnnxRuntimeBackend
    from inference.pipeline import ModelRunner

    return ModelRunner(nodule_model, OnnxRuntimeBackend(nodule_model.weights_path, "m",
                                                        providers=["CPUExecutionProvider"]))


def test_mr_pixels_labelled_ct_are_refused_by_a_ct_model(tmp_path, nodule_model) -> None:  # noqa: ANN001
    assert "CT" in nodule_model.card.modality
    paths = _mr_labelled_ct(tmp_path / "mr_as_ct")
    assert load_series(paths).modality == "CT"      # a volume, labelled CT: only its values give it away
    with pytest.raises(ImplausibleCTError, match=r"pixel values are implausible for CT: the 1st percentile is "
                                                 r"\d+ HU and 0\.0% of voxels are at or below -500 HU") as err:
        _runner(nodule_model).run(paths)
    assert err.value.stage == "load"


def test_a_ct_whose_rescale_was_lost_is_refused(tmp_path, nodule_model) -> None:  # noqa: ANN001
    chest = generate_chest_ct(0, slices=24, rows=64)
    datasets = ct_slices(chest.hu, spacing=chest.spacing, origin=chest.origin)
    for ds in datasets:
        ds.RescaleIntercept = 0        # stored values are HU + 1024: read as HU, air becomes ~0
    with pytest.raises(ImplausibleCTError, match="lost rescale"):
        _runner(nodule_model).run(_write(datasets, tmp_path / "no_rescale"))


def test_a_synthetic_chest_ct_runs_through_the_ct_model(tmp_path, nodule_model) -> None:  # noqa: ANN001
    chest = generate_chest_ct(1, slices=24, rows=64)
    paths = _write(ct_slices(chest.hu, spacing=chest.spacing, origin=chest.origin), tmp_path / "chest")
    result = _runner(nodule_model).run(paths)
    assert set(result.stage_seconds) >= {"load", "preprocess", "infer", "postprocess"}


def test_the_criterion_is_one_percent_at_or_below_minus_50_hu() -> None:
    body = np.full((8, 40, 40), 45.0, dtype=np.float32)    # soft tissue
    body[0] = CT_LOW_HU - 50                                # one slice in eight is fat
    check_ct_values(body)
    lean = np.full((8, 40, 40), 45.0, dtype=np.float32)
    lean[0, 0, 0] = -1000.0                                 # one air voxel is not a body's share
    with pytest.raises(ImplausibleCTError):
        check_ct_values(lean)
