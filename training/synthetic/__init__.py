"""Deterministic synthetic CT generators (chest with nodules, spine with labelled vertebrae) and DICOM writers.

Needs only numpy and pydicom (no torch / MONAI), so the gateway can import it for `dxgate synth`.
"""

from training.synthetic.chest_ct import NODULE_KINDS, Nodule, generate_chest_ct
from training.synthetic.dicom_writer import (
    SUPPORTED_TRANSFER_SYNTAXES,
    SyntheticStudy,
    write_chest_ct_study,
    write_ct_series,
    write_spine_ct_study,
)
from training.synthetic.phantom import SyntheticVolume
from training.synthetic.spine_ct import LEVELS, Vertebra, generate_spine_ct

__all__ = [
    "LEVELS",
    "NODULE_KINDS",
    "SUPPORTED_TRANSFER_SYNTAXES",
    "Nodule",
    "SyntheticStudy",
    "SyntheticVolume",
    "Vertebra",
    "generate_chest_ct",
    "generate_spine_ct",
    "write_chest_ct_study",
    "write_ct_series",
    "write_spine_ct_study",
]
