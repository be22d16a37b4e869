"""Training losses of the segmentation networks, and the model card's words for them."""

from __future__ import annotations

import torch
from monai.losses import DiceCELoss, DiceLoss

from training.config import TrainConfig


class _DiceWeightedCE(torch.nn.Module):
    """Batch Dice over the foreground levels plus cross-entropy with a down-weighted background.

    With 25 levels and a handful in any patch, plain Dice+CE lets the network settle on "all background"
    for hundreds of steps; weighting the background class of the CE term breaks that quickly.
    (The class name is what the spine card's `training.loss` records.)
    """

    def __init__(self, channels: int, background_weight: float = 0.1) -> None:
        super().__init__()
        self.dice = DiceLoss(to_onehot_y=True, softmax=True, include_background=False, batch=True,
                             smooth_nr=1e-5, smooth_dr=1e-5)
        weight = torch.ones(channels)
        weight[0] = background_weight
        self.ce = torch.nn.CrossEntropyLoss(weight=weight)

    def forward(self, logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        self.ce.weight = self.ce.weight.to(logits.device)
        return self.dice(logits, label) + self.ce(logits, label[:, 0].long())


class DiceHardVoxelBCE(torch.nn.Module):
    """Batch Dice plus BCE averaged over the hardest `fraction` of voxels (top-k cross-entropy).

    Plain BCE is a mean over ~400 000 voxels per batch, so a confident false-positive blob of 50 voxels
    moves it by about 1e-3 and the network keeps it. Averaging over the hardest few percent only (which
    always include missed nodule voxels and confident false positives) makes both count.
    """

    def __init__(self, fraction: float) -> None:
        super().__init__()
        self.fraction = fraction
        self.dice = DiceLoss(sigmoid=True, batch=True, smooth_nr=1e-5, smooth_dr=1e-5)

    def forward(self, logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, label.float(), reduction="none")
        k = max(1, int(self.fraction * bce.numel()))
        return self.dice(logits, label) + bce.flatten().topk(k, sorted=False).values.mean()


def make_loss(cfg: TrainConfig) -> torch.nn.Module:
    if cfg.task == "lung-nodule":
        if cfg.hard_voxel_fraction is not None:
            return DiceHardVoxelBCE(cfg.hard_voxel_fraction)
        # BCE keeps a full-size gradient on missed nodule voxels (focal/Dice alone stall at p ~ 0)
        return DiceCELoss(sigmoid=True, batch=True, smooth_nr=1e-5, smooth_dr=1e-5)
    return _DiceWeightedCE(cfg.out_channels)


def loss_description(cfg: TrainConfig) -> str:
    """The model card's words for the training loss."""
    name = type(make_loss(cfg)).__name__
    if cfg.hard_voxel_fraction:
        return f"{name} (BCE over the hardest {cfg.hard_voxel_fraction:.0%} of voxels)"
    return name
