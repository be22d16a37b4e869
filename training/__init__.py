"""Training: synthetic data, MONAI workflows, ONNX export with parity check, registration into models/.

Imports `inference` (for the model card schema) but never `dicom_gateway`.
"""
