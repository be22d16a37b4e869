"""Real-format dataset readers (LUNA16, VerSe, Tianchi lumbar) and MONAI datalist writing.

Each reader returns typed cases with annotations in patient LPS millimetres (PS3.3 C.7.6.2.1.1), so the
metrics in `training.metrics` and the inference findings compare in one coordinate system.
"""

from training.loaders.datalist import read_datalist, verify_sha256sums, write_datalist
from training.loaders.luna16 import Candidate, Case, LoaderError, Nodule, load_luna16
from training.loaders.tianchi import Keypoint, KeypointCase, load_tianchi
from training.loaders.verse import VERTEBRA_LABELS, VERTEBRA_NAMES, Centroid, SpineCase, load_verse

__all__ = [
    "VERTEBRA_LABELS", "VERTEBRA_NAMES", "Candidate", "Case", "Centroid", "Keypoint", "KeypointCase",
    "LoaderError", "Nodule", "SpineCase", "load_luna16", "load_tianchi", "load_verse", "read_datalist",
    "verify_sha256sums", "write_datalist",
]
