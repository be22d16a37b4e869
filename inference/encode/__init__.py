"""DICOM result encoders: one function per output kind, findings + source datasets in, Dataset out.

All outputs are new series in the source study, built with highdicom:
`encode_sr` (TID 1500 Comprehensive 3D SR), `encode_seg` (binary SEG), `encode_gsps` (presentation
state) and `encode_secondary_capture` (burned-in RGB secondary captures).
"""

from inference.encode.gsps import encode_gsps
from inference.encode.sc import encode_secondary_capture
from inference.encode.seg import encode_seg
from inference.encode.sr import encode_sr

__all__ = ["encode_gsps", "encode_secondary_capture", "encode_seg", "encode_sr"]
