"""Series whose every instance is acceptable but whose content is not: each job fails with a clear reason.

Every instance is answered 0x0000 and kept (it is valid DICOM); the series reaches the lung model's rule
and its job ends FAILED at stage load (preprocess for the HU check) with a reason naming the problem.
"""

from __future__ import annotations

import struct

import numpy as np
import pytest
from pydicom.uid import JPEG2000Lossless, generate_uid

from harness.gateway import RunningGateway
from tests.hostile.support import Series, assert_failed, ct, ct_series

pytestmark = pytest.mark.integration

MAX_SLICES = 100  # the suite's limits.max_slices


def test_nan_image_position(gw: RunningGateway) -> None:
    series = ct_series()
    series.datasets[5].ImagePositionPatient = [float("nan"), 0.0, 5.0]
    assert_failed(gw, series, r"position.*(finite|nan)|(finite|nan).*position")


def test_nan_rescale_slope(gw: RunningGateway) -> None:
    series = ct_series()
    for ds in series.datasets:
        ds.RescaleSlope = float("nan")
    assert_failed(gw, series, r"slope")


def test_absurd_50_mm_pixels(gw: RunningGateway) -> None:
    series = ct_series()
    for ds in series.datasets:
        ds.PixelSpacing = [50.0, 50.0]
    assert_failed(gw, series, r"spacing")


def test_mixed_512_and_256_slices(gw: RunningGateway) -> None:
    study, uid = generate_uid(), generate_uid()
    datasets = [ct(study_uid=study, series_uid=uid, instance_number=i, rows=512 if i % 2 else 256,
                   columns=512 if i % 2 else 256) for i in range(1, 17)]
    assert_failed(gw, Series(study, uid, datasets), r"mixed|rows|columns|size|matrix|shape")


def test_slice_without_image_position(gw: RunningGateway) -> None:
    series = ct_series()
    del series.datasets[7].ImagePositionPatient
    assert_failed(gw, series, r"ImagePositionPatient|Image Position|position")


def test_mr_pixels_labelled_ct(gw: RunningGateway) -> None:
    """An MR-like body (0 where CT has air, no lung) labelled CT: implausible Hounsfield units."""
    rows = 64
    yy, xx = np.mgrid[0:rows, 0:rows]
    body = ((yy - rows / 2) ** 2 + (xx - rows / 2) ** 2) < (rows * 0.45) ** 2
    rng = np.random.default_rng(3)
    pixels = (np.where(body, rng.normal(450, 120, (rows, rows)).clip(50, 900), 0) + 1024).astype(np.int32)
    study, uid = generate_uid(), generate_uid()
    datasets = [ct(study_uid=study, series_uid=uid, instance_number=i, rows=rows, columns=rows, pixels=pixels)
                for i in range(1, 21)]
    assert_failed(gw, Series(study, uid, datasets), r"\bHU\b|Hounsfield", stages=("load", "preprocess"))


def test_more_slices_than_limits_max_slices(gw: RunningGateway) -> None:
    """100,000 8x8 slices stand for any count over the cap: 150 are sent against `limits.max_slices: 100`."""
    series = ct_series(n=MAX_SLICES + 50, rows=8)
    assert_failed(gw, series, r"slices")


def test_j2k_frame_declaring_65535_squared_in_a_512_squared_image(gw: RunningGateway) -> None:
    study, uid = generate_uid(), generate_uid()
    datasets = [ct(study_uid=study, series_uid=uid, instance_number=i, rows=512, columns=512,
                   transfer_syntax=JPEG2000Lossless) for i in range(1, 17)]
    target = datasets[8]
    raw = bytearray(target.PixelData)
    siz = raw.find(b"\xff\x4f\xff\x51")  # SOC then SIZ (ITU-T T.800 A.5.1)
    assert siz > 0
    # Lsiz, Rsiz, then Xsiz, Ysiz (image size) ... XTsiz, YTsiz (tile size): 65535 each
    struct.pack_into(">II", raw, siz + 8, 65535, 65535)
    struct.pack_into(">II", raw, siz + 24, 65535, 65535)
    target.PixelData = bytes(raw)
    assert_failed(gw, Series(study, uid, datasets), r"65535|JPEG ?2000|J2K|frame|size",
                  transfer_syntax=JPEG2000Lossless)
