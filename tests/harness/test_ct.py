"""The harness's CT series: all from the one writer (training.synthetic), with the geometry asked for."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from pydicom.uid import MRImageStorage, RLELossless

from harness.ct import (
    BACKGROUND_HU,
    SPHERE_HU,
    build_ct_series,
    dataset_bytes,
    make_ct,
    uids,
    write_ct,
    write_ct_series,
    write_series,
)

WRITER = "DXGATE_SYNTH"  # the ImplementationVersionName of training.synthetic.dicom_writer


def test_every_variant_comes_from_the_one_writer(tmp_path: Path) -> None:
    files = [*write_ct_series(tmp_path / "a", 2), write_ct(tmp_path / "b.dcm"), *write_series(tmp_path / "c")]
    datasets = [*map(pydicom.dcmread, files), make_ct(), *build_ct_series(2)]
    assert {ds.file_meta.ImplementationVersionName for ds in datasets} == {WRITER}


def test_small_slices_are_new_instances_of_one_series(tmp_path: Path) -> None:
    files = write_ct_series(tmp_path, 3, slice_thickness=1.25)
    headers = [pydicom.dcmread(f) for f in files]
    assert len(set(uids(files))) == 3
    assert len({(ds.StudyInstanceUID, ds.SeriesInstanceUID) for ds in headers}) == 1
    assert [float(ds.ImagePositionPatient[2]) for ds in headers] == [0.0, 1.25, 2.5]
    assert [ds.SeriesNumber for ds in headers] == [2, 2, 2]
    assert make_ct().StudyInstanceUID != make_ct().StudyInstanceUID
    rle = write_ct(tmp_path / "rle.dcm", transfer_syntax=RLELossless, orientation="sagittal")
    back = pydicom.dcmread(rle)
    assert back.file_meta.TransferSyntaxUID == RLELossless
    assert [float(v) for v in back.ImageOrientationPatient] == [0.0, 1.0, 0.0, 0.0, 0.0, -1.0]
    assert len(dataset_bytes(rle)) < rle.stat().st_size - 128


def test_sphere_series_geometry_values_and_gaps(tmp_path: Path) -> None:
    iop = (1.0, 0.0, 0.0, 0.0, 0.7071068, -0.7071068)
    files = write_series(tmp_path, shape=(6, 20, 20), spacing=(2.0, 1.5, 1.5), origin=(0.0, 0.0, 0.0), iop=iop,
                         sphere_mm=(15.0, 10.0, -2.0), radius_mm=4.0, skip=[2], modality="MR")
    headers = {int(ds.InstanceNumber): ds for ds in map(pydicom.dcmread, files)}
    assert sorted(headers) == [1, 2, 4, 5, 6] and sorted(headers) != list(headers)  # gap, shuffled order
    normal = np.cross(iop[:3], iop[3:])
    for n, ds in headers.items():
        assert np.allclose([float(v) for v in ds.ImagePositionPatient], (n - 1) * 2.0 * normal, atol=1e-3)
        assert ds.SOPClassUID == MRImageStorage and ds.Modality == "MR" and float(ds.SliceThickness) == 5.0
    hu = np.stack([headers[n].pixel_array * float(headers[n].RescaleSlope) + float(headers[n].RescaleIntercept)
                   for n in sorted(headers)])
    assert hu.max() == SPHERE_HU and abs(np.median(hu) - BACKGROUND_HU) < 5


def test_encoder_grid_is_in_memory_hu(tmp_path: Path) -> None:
    series = build_ct_series(3)
    hu = series[0].pixel_array + float(series[0].RescaleIntercept)
    assert hu[32, 32] == -850 and hu[0, 0] == 40
    assert [float(ds.ImagePositionPatient[2]) for ds in series] == [-100.0, -97.5, -95.0]
