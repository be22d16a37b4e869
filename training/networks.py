"""Networks per task: small MONAI 3-D U-Nets sized for CPU inference with ONNX Runtime."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.nets import UNet


def build_network(
    out_channels: int,
    channels: Sequence[int] = (8, 16, 32, 64),
    strides: Sequence[int] | None = None,
    num_res_units: int = 1,
    dropout: float = 0.0,
) -> torch.nn.Module:
    """A residual 3-D U-Net (MONAI `UNet`) with one input channel and `out_channels` logits.

    `strides` defaults to 2 between every level, so the receptive field grows with `len(channels)`
    (the spine model uses one more level than the nodule model to see several vertebrae at once).
    Instance normalisation keeps the network independent of the batch size used by the sliding window.
    """
    if strides is None:
        strides = (2,) * (len(channels) - 1)
    if len(strides) != len(channels) - 1:
        raise ValueError(f"need {len(channels) - 1} strides for {len(channels)} channel levels, got {strides}")
    return UNet(
        spatial_dims=3,
        in_channels=1,
        out_channels=out_channels,
        channels=tuple(channels),
        strides=tuple(strides),
        num_res_units=num_res_units,
        norm="instance",
        dropout=dropout,
    )


def count_parameters(net: torch.nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in net.parameters() if p.requires_grad)
