"""Backends: one method over named arrays. ONNX Runtime, Triton and Torch are interchangeable."""

from inference.backends.base import Backend

__all__ = ["Backend"]
