"""load_series: sorting along the normal, HU, geometry, and clear errors for series that are not volumes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from harness.ct import BACKGROUND_HU, SPHERE_HU
from inference.errors import VolumeError, WrongModalityError
from inference.volume import load_series


def _ipp(path: Path) -> np.ndarray:
    return np.asarray(pydicom.dcmread(path, stop_before_pixels=True).ImagePositionPatient, dtype=float)


def test_axial_series_sorted_with_spacing_from_positions(series_writer):
    paths = series_writer(shape=(12, 24, 20), spacing=(2.5, 0.8, 0.7), sphere_mm=None)
    vol = load_series(paths, expected_modality=["CT"])

    assert vol.voxels.dtype == np.int16 and vol.voxels.shape == (12, 24, 20)   # exact HU: half of float32
    assert vol.spacing == pytest.approx((2.5, 0.8, 0.7))  # not SliceThickness (5.0)
    assert vol.modality == "CT" and vol.frame_of_reference_uid and vol.series_instance_uid
    by_uid = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID: _ipp(p) for p in paths}
    z = [by_uid[uid][2] for uid in vol.sop_instance_uids]
    assert np.all(np.diff(z) > 0)  # ascending along the normal (0, 0, 1)
    assert abs(float(vol.voxels.mean()) - BACKGROUND_HU) < 5  # rescale slope / intercept applied
    np.testing.assert_allclose(vol.origin, by_uid[vol.sop_instance_uids[0]])


@pytest.mark.parametrize("iop", [(1, 0, 0, 0, 1, 0), (0, 1, 0, 0, 0, -1), (0.8, 0.6, 0, 0, 0, -1)],
                         ids=["axial", "sagittal", "oblique"])
def test_affine_maps_indices_to_patient_mm(series_writer, iop):
    row, col = np.asarray(iop[:3], dtype=float), np.asarray(iop[3:], dtype=float)
    sphere = np.array([10.0, -20.0, 5.0]) + 9 * 0.9 * row + 8 * 1.25 * col + 5 * 3.0 * np.cross(row, col)
    paths = series_writer(shape=(10, 16, 18), spacing=(3.0, 1.25, 0.9), origin=(10.0, -20.0, 5.0), iop=iop,
                          sphere_mm=tuple(sphere), radius_mm=3.5)
    vol = load_series(paths)
    # every slice's ImagePositionPatient is the centre of its voxel [k, 0, 0]
    for k, uid in enumerate(vol.sop_instance_uids):
        path = next(p for p in paths if p.stem == uid)
        np.testing.assert_allclose(vol.index_to_patient(np.array([k, 0, 0])), _ipp(path), atol=1e-3)
    # one step along x (column) moves by PixelSpacing[1] along the row cosine
    np.testing.assert_allclose(vol.index_to_patient(np.array([0, 0, 1])) - vol.origin,
                               0.9 * np.asarray(iop[:3], dtype=float), atol=1e-9)
    idx = np.array([[1.5, 2.0, 3.25], [9.0, 15.0, 17.0]])
    np.testing.assert_allclose(vol.patient_to_index(vol.index_to_patient(idx)), idx, atol=1e-9)
    affine_pt = (vol.affine @ np.append(idx[0], 1.0))[:3]
    np.testing.assert_allclose(affine_pt, vol.index_to_patient(idx[0]))
    # the sphere voxels sit where they were written
    centre = vol.index_to_patient(np.argwhere(vol.voxels > 0).mean(axis=0))
    np.testing.assert_allclose(centre, sphere, atol=0.5)


def test_rle_compressed_series_decodes_like_uncompressed(tmp_path):
    from harness.ct import write_series

    plain = load_series(write_series(tmp_path / "plain", seed=3))
    rle = load_series(write_series(tmp_path / "rle", seed=3, compress=True))
    np.testing.assert_array_equal(plain.voxels, rle.voxels)
    assert rle.voxels.max() == SPHERE_HU


def _rewrite(paths, edit) -> list[Path]:  # noqa: ANN001
    for p in paths:
        ds = pydicom.dcmread(p)
        edit(ds)
        ds.save_as(p, enforce_file_format=True)
    return paths


def test_fractional_rescale_gives_float32_hu(series_writer):
    exact = load_series(series_writer("exact", seed=4))
    def halve(ds):  # noqa: ANN001, ANN202
        ds.RescaleSlope, ds.RescaleIntercept = 0.5, -512.25
    vol = load_series(_rewrite(series_writer("half", seed=4), halve))
    assert vol.voxels.dtype == np.float32
    np.testing.assert_allclose(vol.voxels, (exact.voxels.astype(np.float64) + 1024) * 0.5 - 512.25, atol=1e-3)


def test_hu_beyond_int16_falls_back_to_float32(series_writer):
    def unsigned_high(ds):  # noqa: ANN001, ANN202
        arr = ds.pixel_array.astype(np.int32)
        ds.PixelRepresentation = 0
        if int(ds.InstanceNumber) == 3:
            arr[0, 0] = 60000   # stored 60000 - 1024 = 58976 HU does not fit int16
        ds.PixelData = np.clip(arr, 0, 65535).astype(np.uint16).tobytes()
    vol = load_series(_rewrite(series_writer("u16", seed=5), unsigned_high))
    assert vol.voxels.dtype == np.float32
    assert float(vol.voxels.max()) == 60000 - 1024
    assert abs(float(np.median(vol.voxels)) - BACKGROUND_HU) < 5


def test_wrong_modality(series_writer):
    with pytest.raises(WrongModalityError, match="'MR'"):
        load_series(series_writer(modality="MR"), expected_modality=["CT"])


def test_missing_slice(series_writer):
    with pytest.raises(VolumeError, match="irregular slice spacing"):
        load_series(series_writer(skip=[5]))


def test_duplicate_position_of_different_instances(series_writer, tmp_path):
    paths = series_writer()
    ds = pydicom.dcmread(paths[0])
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    copy = tmp_path / "dup.dcm"
    ds.save_as(copy)
    with pytest.raises(VolumeError, match="duplicate slice position"):
        load_series([*paths, copy])


def test_the_same_instance_twice_is_tolerated(series_writer):
    paths = series_writer(shape=(6, 8, 8))
    assert load_series([*paths, paths[2]]).voxels.shape == (6, 8, 8)


def test_single_slice(series_writer):
    with pytest.raises(VolumeError, match="at least 2"):
        load_series(series_writer()[:1])


def test_mixed_series(series_writer):
    a = series_writer("a", shape=(6, 8, 8))
    b = series_writer("b", shape=(6, 8, 8), origin=(-30.0, -30.0, 112.0))
    with pytest.raises(VolumeError, match="mixed series"):
        load_series(a + b)
    c = series_writer("c", shape=(6, 10, 8), origin=(-30.0, -30.0, 112.0))
    with pytest.raises(VolumeError, match="mixed series"):
        load_series(a + c)


def test_missing_position(series_writer):
    paths = series_writer(shape=(4, 8, 8))
    ds = pydicom.dcmread(paths[1])
    del ds.ImagePositionPatient
    ds.save_as(paths[1])
    with pytest.raises(VolumeError, match="ImagePositionPatient"):
        load_series(paths)


def test_no_pixel_data(series_writer):
    paths = series_writer(shape=(4, 8, 8))
    ds = pydicom.dcmread(paths[0])
    del ds.PixelData
    ds.save_as(paths[0])
    with pytest.raises(VolumeError, match="no pixel data"):
        load_series(paths)


def test_not_dicom(series_writer, tmp_path):
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not a dicom file")
    with pytest.raises(VolumeError, match="not a readable DICOM file"):
        load_series([*series_writer(shape=(4, 8, 8)), junk])
