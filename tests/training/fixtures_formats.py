"""Small on-disk fixtures in the real dataset formats (LUNA16 .mhd/.csv, VerSe NIfTI/JSON, Tianchi DICOM/JSON).

Each writer returns what a correct reader must recover, computed independently of the readers
(SimpleITK's own index->physical mapping, nibabel's array reorientation, hand-written plane geometry).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import nibabel.orientations as nio
import numpy as np
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid
from scipy.ndimage import center_of_mass

LUNA_UIDS = ("1.3.6.1.4.1.14519.5.2.1.6279.6001.100", "1.3.6.1.4.1.14519.5.2.1.6279.6001.200")


def write_luna16(root: Path) -> dict[str, dict]:
    """Two scans (one with a flipped/permuted direction matrix) + annotations, candidates, excluded CSVs.

    Returns {seriesuid: {"ijk": [...], "world": [...], "spacing", "origin", "direction", "size"}}.
    """
    geoms = {
        LUNA_UIDS[0]: dict(size=(16, 12, 8), spacing=(0.7, 0.8, 2.5), origin=(-120.0, -110.5, -300.0),
                           direction=(1, 0, 0, 0, 1, 0, 0, 0, 1)),
        LUNA_UIDS[1]: dict(size=(10, 14, 6), spacing=(0.6, 0.65, 1.25), origin=(100.0, 80.0, -50.0),
                           direction=(-1, 0, 0, 0, 0, 1, 0, -1, 0)),
    }
    ijks = {LUNA_UIDS[0]: [(3.0, 4.5, 2.0), (10.25, 7.0, 5.5)], LUNA_UIDS[1]: [(2.0, 3.0, 1.0)]}
    expected: dict[str, dict] = {}
    rows, cand_rows = [], []
    for n, (uid, g) in enumerate(geoms.items()):
        img = sitk.Image([int(s) for s in g["size"]], sitk.sitkInt16)
        img.SetSpacing(g["spacing"])
        img.SetOrigin(g["origin"])
        img.SetDirection([float(v) for v in g["direction"]])
        folder = root / f"subset{n}"
        folder.mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(img, str(folder / f"{uid}.mhd"))
        worlds = [img.TransformContinuousIndexToPhysicalPoint(ijk) for ijk in ijks[uid]]
        expected[uid] = {**g, "ijk": ijks[uid], "world": worlds}
        for k, w in enumerate(worlds):
            rows.append([uid, *w, 5.0 + k])
            cand_rows.append([uid, *w, 1])
        cand_rows.append([uid, *(v + 40 for v in worlds[0]), 0])
    _csv(root / "annotations.csv", ["seriesuid", "coordX", "coordY", "coordZ", "diameter_mm"], rows)
    _csv(root / "candidates.csv", ["seriesuid", "coordX", "coordY", "coordZ", "class"], cand_rows)
    excluded_dir = root / "evaluationScript" / "annotations"
    excluded_dir.mkdir(parents=True)
    _csv(excluded_dir / "annotations_excluded.csv", ["seriesuid", "coordX", "coordY", "coordZ", "diameter_mm"],
         [[LUNA_UIDS[1], 1.0, 2.0, 3.0, ""]])
    return expected


def _csv(path: Path, header: list[str], rows: list[list]) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def write_verse(root: Path, subject: str = "sub-verse900", axcodes: tuple[str, str, str] = ("P", "I", "R")
                ) -> dict[int, tuple[float, float, float]]:
    """A VerSe'20-style subject: CT + vertebra mask (labels 20, 21, 22) + centroid JSON in `axcodes`.

    The image is stored LAS-ish with anisotropic spacing and an offset; centroids are computed, as VerSe
    did, as centres of mass of the mask reoriented to `axcodes`. Returns {label: expected LPS mm}.
    """
    shape = (20, 18, 24)
    affine = np.array([[-0.8, 0, 0, 40.0], [0, 1.1, 0, -60.0], [0, 0, 1.5, 210.0], [0, 0, 0, 1]])
    mask = np.zeros(shape, dtype=np.uint8)
    blobs = {20: (5, 6, 4), 21: (9, 10, 11), 22: (14, 7, 18)}
    expected: dict[int, tuple[float, float, float]] = {}
    for label, (i, j, k) in blobs.items():
        mask[i - 1:i + 2, j - 1:j + 2, k - 1:k + 3] = label      # centre of mass (i, j, k + 0.5)
        ras = affine[:3, :3] @ np.array([i, j, k + 0.5]) + affine[:3, 3]
        expected[label] = (-ras[0], -ras[1], ras[2])
    raw = root / "rawdata" / subject
    der = root / "derivatives" / subject
    raw.mkdir(parents=True)
    der.mkdir(parents=True)
    ct = (mask.astype(np.int16) * 10 - 100)
    nib.save(nib.Nifti1Image(ct, affine), str(raw / f"{subject}_dir-ax_ct.nii.gz"))
    nib.save(nib.Nifti1Image(mask, affine), str(der / f"{subject}_dir-ax_seg-vert_msk.nii.gz"))
    transform = nio.ornt_transform(nio.io_orientation(affine), nio.axcodes2ornt(axcodes))
    reoriented = nio.apply_orientation(mask, transform)
    entries: list[dict] = [{"direction": list(axcodes)}]
    for label in blobs:
        c = center_of_mass(reoriented == label)
        entries.append({"label": label, "X": round(c[0], 3), "Y": round(c[1], 3), "Z": round(c[2], 3)})
    entries.append({"label": 23, "X": float("nan"), "Y": 1.0, "Z": 1.0})
    (der / f"{subject}_dir-ax_seg-subreg_ctd.json").write_text(json.dumps(entries), encoding="utf-8")
    return expected


def _mr_slice(path: Path, study: str, series: str, sop: str, position: tuple[float, float, float],
              instance: int) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = sop
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, sop
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.Modality, ds.InstanceNumber, ds.SeriesDescription = "MR", instance, "T2_SAG"
    ds.ImagePositionPatient = list(position)
    ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]     # sagittal: rows -> posterior, columns -> inferior
    ds.PixelSpacing = [0.5, 0.6]                          # (row, column) mm
    ds.Rows = ds.Columns = 8
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = np.arange(64, dtype=np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)


def write_tianchi(root: Path) -> dict[str, dict]:
    """lumbar_train2/study<N>/image<M>.dcm (two sagittal slices per study) + lumbar_train2_annotation.json.

    Returns {study_uid: {"instance_uid", "points": {tag: (classes, xy_px, expected LPS mm)}}}.
    """
    items, expected = [], {}
    for n in range(2):
        study, series = generate_uid(), generate_uid()
        folder = root / "lumbar_train2" / f"study{n}"
        folder.mkdir(parents=True)
        sops = [generate_uid() for _ in range(2)]
        for m, sop in enumerate(sops):
            _mr_slice(folder / f"image{m}.dcm", study, series, sop, (-3.0 + 4.0 * m, -20.0, 40.0), m + 1)
        ipp = np.array([1.0, -20.0, 40.0])                # the annotated slice is image1
        points = {"L1": (("v2",), (2.0, 3.0)), "L1-L2": (("v1", "v3"), (4.5, 5.0)), "L5-S1": (("v1",), (1.0, 7.0))}
        pts, exp = [], {}
        for tag, (classes, (c, r)) in points.items():
            kind = "disc" if "-" in tag else "vertebra"
            mm = ipp + c * 0.6 * np.array([0, 1, 0]) + r * 0.5 * np.array([0, 0, -1])
            exp[tag] = (classes, (c, r), tuple(float(v) for v in mm))
            pts.append({"coord": [c, r], "tag": {"identification": tag, kind: ",".join(classes)}, "zIndex": 2})
        items.append({"studyUid": study, "version": "v0.1",
                      "data": [{"instanceUid": sops[1], "seriesUid": series,
                                "annotation": [{"annotator": 54, "data": {"point": pts}}]}]})
        expected[study] = {"instance_uid": sops[1], "series_uid": series, "points": exp}
    items.append({"studyUid": "1.2.3.not.on.disk", "data": [{"instanceUid": "1.2", "seriesUid": "1.3",
                                                              "annotation": [{"data": {"point": []}}]}]})
    (root / "lumbar_train2_annotation.json").write_text(json.dumps(items), encoding="utf-8")
    return expected
