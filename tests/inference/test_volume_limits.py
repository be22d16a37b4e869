"""Bounded inputs: slice, voxel and model-grid caps before allocation, sane geometry and rescale, no codestream
that declares more than its image."""

from __future__ import annotations

import io
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import JPEG2000Lossless, JPEGLSLossless

from harness.ct import ct_slices
from inference.codestream import FrameSizeError, check_frame_size, j2k_size, jpeg_size
from inference.errors import VolumeError
from inference.limits import VolumeLimits
from inference.preprocess import PreprocessError, preprocess
from inference.volume import load_series


def _rewrite(paths: list[Path], edit, only: int | None = None) -> list[Path]:  # noqa: ANN001
    for i, p in enumerate(paths):
        if only is None or i == only:
            ds = pydicom.dcmread(p)
            edit(ds)
            ds.save_as(p, enforce_file_format=True)
    return paths


def _undecodable(ds: pydicom.Dataset) -> None:
    ds.PixelData = b"\x00" * 10   # far fewer bytes than Rows x Columns: decoding would fail


# -- slices and voxels, from the headers -------------------------------------------------------------------
def test_too_many_slices_refused_before_any_header_is_read(series_writer, tmp_path) -> None:  # noqa: ANN001
    paths = series_writer(shape=(12, 8, 8))
    with pytest.raises(VolumeError, match=r"12 slices, more than the limit of 10 \(limits.max_slices\)"):
        load_series(paths, limits=VolumeLimits(max_slices=10))
    # 100,000 8x8 slices: refused from the count alone (the paths need not even exist yet)
    many = [tmp_path / f"never_written_{i}.dcm" for i in range(100_000)]
    with pytest.raises(VolumeError, match="100000 slices, more than the limit of 3000"):
        load_series(many)
    assert load_series(paths, limits=VolumeLimits(max_slices=12)).shape == (12, 8, 8)


def test_too_many_voxels_refused_before_decoding(series_writer) -> None:  # noqa: ANN001
    paths = _rewrite(series_writer(shape=(20, 40, 40)), _undecodable)
    with pytest.raises(VolumeError, match=r"20 slices of 40x40 are 32,000 voxels.*limits.max_voxels"):
        load_series(paths, limits=VolumeLimits(max_voxels=31_999))
    with pytest.raises(VolumeError, match="cannot be decoded"):   # within the cap, the decoder is reached
        load_series(paths, limits=VolumeLimits(max_voxels=32_000))


def test_model_grid_refused_before_resampling(series_writer, nodule_model) -> None:  # noqa: ANN001
    from inference.backends.onnxruntime_backend import OnnxRuntimeBackend
    from inference.device_preprocess import DevicePreprocessor
    from inference.pipeline import ModelRunner

    volume = load_series(series_writer(shape=(20, 40, 40), spacing=(2.0, 1.5, 1.5)))
    card = nodule_model.card.model_copy(update={"input": nodule_model.card.input.model_copy(
        update={"spacing_mm": (0.5, 0.5, 0.5)})})          # 80 x 120 x 120 = 1,152,000 model voxels
    small = VolumeLimits(max_model_grid_voxels=1_000_000)
    with pytest.raises(PreprocessError, match=r"80x120x120 = 1,152,000 voxels.*limits.max_model_grid_voxels"):
        preprocess(volume, card, limits=small)
    with pytest.raises(PreprocessError, match="model grid too large"):
        DevicePreprocessor(["CPUExecutionProvider"], limits=small)(volume, card)
    assert preprocess(volume, card, limits=VolumeLimits(max_model_grid_voxels=1_152_000))[0].shape == (80, 120, 120)
    # the runner carries its limits to the default preprocessor: the job fails at stage preprocess
    backend = OnnxRuntimeBackend(nodule_model.weights_path, "m", providers=["CPUExecutionProvider"])
    tiny = VolumeLimits(max_model_grid_voxels=1000)          # the card's own 2 mm grid is 20 x 30 x 30
    with pytest.raises(PreprocessError, match="model grid too large") as err:
        ModelRunner(nodule_model, backend, limits=tiny).run(series_writer("again"))
    assert err.value.stage == "preprocess"


# -- geometry and rescale ------------------------------------------------------------------------------------
def _set(keyword: str, value: object):  # noqa: ANN202
    def edit(ds: pydicom.Dataset) -> None:
        setattr(ds, keyword, value)
    return edit


@pytest.mark.parametrize(("keyword", "value", "message"), [
    ("ImagePositionPatient", [0.0, float("nan"), 10.0], "ImagePositionPatient is not finite"),
    ("ImageOrientationPatient", [1.0, 0.0, 0.0, 0.0, float("inf"), 0.0], "ImageOrientationPatient is not finite"),
    ("PixelSpacing", [float("nan"), 1.5], "PixelSpacing is not finite"),
    ("PixelSpacing", [50.0, 50.0], "PixelSpacing 50/50 mm is not a plausible pixel size"),
    ("PixelSpacing", [0.0, 1.5], "PixelSpacing 0/1.5 mm is not a plausible pixel size"),
    ("RescaleSlope", float("nan"), "RescaleSlope is not finite"),
    ("RescaleSlope", 0.0, "RescaleSlope is 0"),
    ("RescaleIntercept", float("-inf"), "RescaleIntercept is not finite"),
    ("ImagePositionPatient", [0.0, 1.0], "ImagePositionPatient has 2 values, expected 3"),
], ids=["nan-position", "inf-orientation", "nan-pixel-spacing", "50mm-pixels", "0mm-pixels", "nan-slope",
        "zero-slope", "inf-intercept", "two-value-position"])
def test_non_finite_or_absurd_values_fail_at_load(series_writer, keyword, value, message) -> None:  # noqa: ANN001
    from pydicom import config

    paths = series_writer(shape=(6, 8, 8))
    target = 0 if keyword == "PixelSpacing" else 3   # the first file given sets the grid
    with config.disable_value_validation():
        _rewrite(paths, _set(keyword, value), only=target)
    with pytest.raises(VolumeError, match=message) as err:
        load_series(paths)
    assert err.value.stage == "load"


def test_a_slice_without_image_position(series_writer) -> None:  # noqa: ANN001
    paths = series_writer(shape=(6, 8, 8))
    _rewrite(paths, lambda ds: delattr(ds, "ImagePositionPatient"), only=4)
    with pytest.raises(VolumeError, match=rf"{paths[4].name}: ImagePositionPatient missing .*every slice"):
        load_series(paths)


def test_absurd_slice_spacing(series_writer) -> None:  # noqa: ANN001
    with pytest.raises(VolumeError, match="slice spacing 60 mm is not a plausible volume"):
        load_series(series_writer(shape=(4, 8, 8), spacing=(60.0, 1.0, 1.0)))
    assert load_series(series_writer("ok", shape=(4, 8, 8), spacing=(10.0, 1.0, 1.0))).spacing[0] == 10.0


# -- compressed frames that declare another size -------------------------------------------------------------
def _j2k_series(folder: Path, rows: int = 512) -> list[Path]:
    hu = np.full((2, rows, rows), -1000.0, dtype=np.float32)
    hu[:, rows // 4: 3 * rows // 4, rows // 4: 3 * rows // 4] = 40.0
    folder.mkdir(parents=True)
    paths = []
    for k, ds in enumerate(ct_slices(hu, spacing=(1.0, 0.7, 0.7), origin=(0.0, 0.0, 0.0))):
        ds.compress(JPEG2000Lossless)
        paths.append(folder / f"{k}.dcm")
        ds.save_as(paths[-1], enforce_file_format=True)
    return paths


def _declare_size(path: Path, rows: int, columns: int) -> None:
    """Edit the SIZ marker (JPEG 2000 Part 1 A.5.1) of the file's frame: Xsiz, Ysiz."""
    ds = pydicom.dcmread(path)
    frame = bytearray(next(generate_frames(ds.PixelData, number_of_frames=1)))
    assert frame[:4] == b"\xff\x4f\xff\x51"
    frame[8:16] = struct.pack(">II", columns, rows)
    ds.PixelData = encapsulate([bytes(frame)])
    ds.save_as(path, enforce_file_format=True)


def test_j2k_frame_sizes_are_read_from_real_codestreams(tmp_path) -> None:  # noqa: ANN001
    paths = _j2k_series(tmp_path / "j2k", rows=64)
    frame = next(generate_frames(pydicom.dcmread(paths[0]).PixelData, number_of_frames=1))
    assert j2k_size(frame) == (64, 64, 1)
    check_frame_size(paths[0], JPEG2000Lossless)
    assert load_series(paths).voxels[0, 32, 32] == 40           # a faithful J2K series still loads
    with pytest.raises(FrameSizeError, match="no SIZ marker"):
        j2k_size(b"\xff\xd8\xff\xe0" + bytes(60))


def test_jpeg_and_jpeg_ls_frame_sizes(tmp_path) -> None:  # noqa: ANN001
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.zeros((48, 80), dtype=np.uint8)).save(buf, format="JPEG")
    assert jpeg_size(buf.getvalue()) == (48, 80, 1)
    (ds,) = ct_slices(np.zeros((1, 40, 56), np.float32), spacing=(1.0, 0.7, 0.7), origin=(0.0, 0.0, 0.0))
    ds.compress(JPEGLSLossless)
    assert jpeg_size(next(generate_frames(ds.PixelData, number_of_frames=1))) == (40, 56, 1)


def test_j2k_frame_declaring_65535_squared_in_a_512_image_is_refused_before_decoding(tmp_path) -> None:  # noqa: ANN001
    """OpenJPEG would allocate ~17 GB for this 2 KB frame: load it in a child whose address space is capped at
    2 GiB, so that a missing check fails this test (MemoryError) instead of the machine."""
    paths = _j2k_series(tmp_path / "bomb")
    _declare_size(paths[1], 65535, 65535)
    assert paths[1].stat().st_size < 50_000
    child = textwrap.dedent(f"""
        import resource, sys
        resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))
        from inference.volume import load_series
        from inference.errors import VolumeError
        try:
            load_series({[str(p) for p in paths]!r})
        except VolumeError as exc:
            print("REFUSED", exc)
            sys.exit(0)
        print("LOADED")
    """)
    proc = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "REFUSED 1.dcm: the compressed frame declares 65535x65535 with 1 component(s), the image is 512x512" \
        in proc.stdout, proc.stdout


def test_the_gateway_bounds_every_runner_by_its_limits_settings(tmp_path, nodule_model, series_writer) -> None:  # noqa: ANN001
    from dicom_gateway.server import load_models
    from dicom_gateway.settings import load_settings
    from harness.gateway import write_config

    config = write_config(tmp_path, nodule_model.folder.parent, rules=[],
                          limits={"max_slices": 16, "max_voxels": 10_000_000, "max_model_grid_voxels": 5_000_000})
    loaded = load_models(load_settings(config))
    runner = loaded[nodule_model.name].runner
    assert runner.limits == VolumeLimits(max_slices=16, max_voxels=10_000_000, max_model_grid_voxels=5_000_000)
    with pytest.raises(VolumeError, match=r"20 slices, more than the limit of 16 \(limits.max_slices\)"):
        runner.run(series_writer(shape=(20, 40, 40)))
