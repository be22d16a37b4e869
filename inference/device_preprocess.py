"""Preprocessing on the inference device: resample + HU window as one ONNX graph run by ONNX Runtime.

Linear resampling with clamped edges (`preprocess.resample`: source index = model index * target /
source spacing, scipy `mode="nearest"`) is separable: along each axis out = A @ in, where A (n_out x n_in)
holds the two interpolation weights of every output voxel. The graph takes the stored HU volume (int16
when exact, so half the bytes cross PCIe) and the three small matrices, and returns the windowed model
input. Used when the model's own session runs on CUDA; on CPU `preprocess.preprocess` (scipy) is
cheaper than dense products, so the CPU provider here serves the parity tests.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from inference.limits import DEFAULT_LIMITS, VolumeLimits
from inference.model_card import ModelCard
from inference.preprocess import PreprocessError, ResampleInfo, model_grid_shape
from inference.volume import Volume

log = logging.getLogger(__name__)

_CUDA = ("CUDAExecutionProvider", {"use_tf32": "0"})   # TF32 would cost ~1 HU of precision in the products


def interpolation_matrix(n_in: int, n_out: int, scale: float) -> np.ndarray:
    """[n_out, n_in] float32: row i linearly interpolates source position i * scale, edges clamped."""
    pos = np.clip(np.arange(n_out, dtype=np.float64) * scale, 0.0, n_in - 1)
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(lo + 1, n_in - 1)
    w = pos - lo
    a = np.zeros((n_out, n_in), dtype=np.float64)
    np.add.at(a, (np.arange(n_out), lo), 1.0 - w)
    np.add.at(a, (np.arange(n_out), hi), w)
    return a.astype(np.float32)


def build_graph(volume_dtype: np.dtype) -> bytes:
    """Serialized ONNX model: (hu [Z,Y,X], az, ay, ax, low, inv_width) -> image [Zo,Yo,Xo] in [0, 1]."""
    from onnx import TensorProto, helper

    elem = TensorProto.INT16 if np.dtype(volume_dtype) == np.int16 else TensorProto.FLOAT
    f = TensorProto.FLOAT
    nodes = [
        helper.make_node("Cast", ["hu"], ["v"], to=f),
        helper.make_node("Transpose", ["ax"], ["axT"], perm=[1, 0]),
        helper.make_node("MatMul", ["v", "axT"], ["t1"]),            # [Z, Y, Xo]
        helper.make_node("MatMul", ["ay", "t1"], ["t2"]),            # [Z, Yo, Xo]
        helper.make_node("Constant", [], ["flat"], value=helper.make_tensor("flat", TensorProto.INT64, [2], [0, -1])),
        helper.make_node("Reshape", ["t2", "flat"], ["t2f"]),        # [Z, Yo*Xo]
        helper.make_node("MatMul", ["az", "t2f"], ["t3"]),           # [Zo, Yo*Xo]
        helper.make_node("Shape", ["az"], ["sz"], start=0, end=1),
        helper.make_node("Shape", ["ay"], ["sy"], start=0, end=1),
        helper.make_node("Shape", ["ax"], ["sx"], start=0, end=1),
        helper.make_node("Concat", ["sz", "sy", "sx"], ["shape"], axis=0),
        helper.make_node("Reshape", ["t3", "shape"], ["r"]),
        helper.make_node("Sub", ["r", "low"], ["s"]),
        helper.make_node("Mul", ["s", "inv_width"], ["m"]),
        helper.make_node("Constant", [], ["zero"], value=helper.make_tensor("zero", f, [], [0.0])),
        helper.make_node("Constant", [], ["one"], value=helper.make_tensor("one", f, [], [1.0])),
        helper.make_node("Clip", ["m", "zero", "one"], ["image"]),
    ]
    graph = helper.make_graph(
        nodes, "dxgate_preprocess",
        [helper.make_tensor_value_info("hu", elem, ["Z", "Y", "X"]),
         helper.make_tensor_value_info("az", f, ["Zo", "Z"]),
         helper.make_tensor_value_info("ay", f, ["Yo", "Y"]),
         helper.make_tensor_value_info("ax", f, ["Xo", "X"]),
         helper.make_tensor_value_info("low", f, []),
         helper.make_tensor_value_info("inv_width", f, [])],
        [helper.make_tensor_value_info("image", f, ["Zo", "Yo", "Xo"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="dxgate")
    model.ir_version = 8
    return model.SerializeToString()


class DevicePreprocessor:
    """`preprocess(volume, card)` with the resampling and windowing done by ONNX Runtime on `providers`; the model
    grid is checked against `limits` before anything is sent to the device."""

    def __init__(self, providers: Sequence[str | tuple[str, dict]] | None = None,
                 limits: VolumeLimits = DEFAULT_LIMITS) -> None:
        import onnxruntime as ort

        wanted = list(providers) if providers else [_CUDA, "CPUExecutionProvider"]
        self.limits = limits
        self._ort = ort
        self._providers = wanted
        self._sessions: dict[str, ort.InferenceSession] = {}

    def _session(self, dtype: np.dtype):  # noqa: ANN202 - onnxruntime.InferenceSession
        key = np.dtype(dtype).name
        if key not in self._sessions:
            options = self._ort.SessionOptions()
            options.graph_optimization_level = self._ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            self._sessions[key] = self._ort.InferenceSession(build_graph(dtype), sess_options=options,
                                                             providers=self._providers)
            log.info("device preprocessing (%s) on %s", key, self._sessions[key].get_providers())
        return self._sessions[key]

    @property
    def providers(self) -> list[str]:
        return list(self._session(np.dtype(np.int16)).get_providers())

    def __call__(self, volume: Volume, card: ModelCard) -> tuple[np.ndarray, ResampleInfo]:
        target = tuple(float(s) for s in card.input.spacing_mm)
        low, high = (float(v) for v in card.input.window)
        if not high > low:
            raise PreprocessError(f"window high ({high}) must exceed low ({low})")
        out_shape = model_grid_shape(volume, card, self.limits)
        src = volume.voxels if volume.voxels.dtype in (np.int16, np.float32) else volume.voxels.astype(np.float32)
        mats = [interpolation_matrix(n, m, t / s)
                for n, m, s, t in zip(src.shape, out_shape, volume.spacing, target, strict=True)]
        feeds = {"hu": np.ascontiguousarray(src), "az": mats[0], "ay": mats[1], "ax": mats[2],
                 "low": np.array(low, np.float32), "inv_width": np.array(1.0 / (high - low), np.float32)}
        try:
            (image,) = self._session(src.dtype).run(["image"], feeds)
        except Exception as exc:  # onnxruntime raises its own types (e.g. out of device memory)
            raise PreprocessError(f"device preprocessing failed: {exc}") from exc
        return image, ResampleInfo.of(volume, target, image.shape)


def device_preprocessor_for(backend: object, limits: VolumeLimits = DEFAULT_LIMITS) -> DevicePreprocessor | None:
    """A DevicePreprocessor (checking `limits`) when `backend` is an ONNX Runtime session on CUDA / TensorRT, else
    None."""
    from inference.backends.onnxruntime_backend import GPU_PROVIDERS

    providers = getattr(backend, "providers", None)
    if not providers or providers[0] not in GPU_PROVIDERS:
        return None
    try:
        pre = DevicePreprocessor(limits=limits)
        if pre.providers[0] != "CUDAExecutionProvider":
            return None
    except Exception as exc:  # no usable CUDA provider for the small graph: keep the scipy path
        log.warning("device preprocessing unavailable (%s); preprocessing on the CPU", exc)
        return None
    return pre
