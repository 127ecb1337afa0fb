"""Segmentation losses shared by every method.

All losses take logits ``(B, C, H, W)`` and integer targets ``(B, H, W)``; pixels equal to
``ignore_index`` contribute nothing. An optional per-pixel ``weight`` ``(B, H, W)`` scales each pixel's
contribution (UAPS's uncertainty weighting); a loss whose every pixel is ignored is exactly zero and
keeps its graph, so it can be summed with others.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from semiseg.errors import ConfigError

DICE_SMOOTH = 1e-5


def _valid(target: torch.Tensor, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    valid = target != ignore_index
    return valid, torch.where(valid, target, torch.zeros_like(target))


def cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int = 255,
    weight: torch.Tensor | None = None,
    class_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean cross-entropy over labeled pixels, each scaled by ``weight`` (B, H, W) when given."""
    per_pixel = F.cross_entropy(logits, target, weight=class_weights, ignore_index=ignore_index, reduction="none")
    valid = (target != ignore_index).to(per_pixel.dtype)
    if weight is not None:
        per_pixel = per_pixel * weight
    return per_pixel.sum() / valid.sum().clamp_min(1.0)


def dice_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int = 255,
    weight: torch.Tensor | None = None,
    smooth: float = DICE_SMOOTH,
) -> torch.Tensor:
    """Soft Dice loss ``1 - mean_c (2|P_c ∩ Y_c| + s) / (|P_c| + |Y_c| + s)`` over all classes (background
    included, the SSL4MIS/UAPS convention), computed over the batch; ``weight`` scales each pixel."""
    num_classes = logits.shape[1]
    valid, safe_target = _valid(target, ignore_index)
    pixel_weight = valid.to(logits.dtype)
    if weight is not None:
        pixel_weight = pixel_weight * weight
    probs = logits.softmax(dim=1) * pixel_weight.unsqueeze(1)
    one_hot = F.one_hot(safe_target, num_classes).permute(0, 3, 1, 2).to(logits.dtype) * pixel_weight.unsqueeze(1)
    dims = (0, 2, 3)
    intersection = (probs * one_hot).sum(dims)
    denominator = probs.sum(dims) + one_hot.sum(dims)
    dice = (2 * intersection + smooth) / (denominator + smooth)
    return 1.0 - dice.mean()  # every pixel ignored: each class scores s/s = 1, the loss is exactly 0


def ce_dice_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int = 255,
    weight: torch.Tensor | None = None,
    class_weights: torch.Tensor | None = None,
    ce_weight: float = 0.5,
    dice_weight: float = 0.5,
) -> torch.Tensor:
    """``ce_weight * CE + dice_weight * Dice`` (0.5 each: the UAPS supervised loss)."""
    loss = logits.new_zeros(())
    if ce_weight:
        loss = loss + ce_weight * cross_entropy(logits, target, ignore_index, weight, class_weights)
    if dice_weight:
        loss = loss + dice_weight * dice_loss(logits, target, ignore_index, weight)
    return loss


def class_weight_tensor(class_weights: Sequence[float] | None, num_classes: int) -> torch.Tensor | None:
    if class_weights is None:
        return None
    if len(class_weights) != num_classes:
        raise ConfigError(
            f"method.loss.class_weights has {len(class_weights)} values for {num_classes} classes; give one per class"
        )
    return torch.tensor(list(class_weights), dtype=torch.float32)
