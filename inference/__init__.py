"""Model serving: models/ reader, volume loading, transforms, backends, postprocessing, DICOM encoders.

Imports neither `dicom_gateway` nor `training`, so a GPU inference image needs no training stack.
"""
