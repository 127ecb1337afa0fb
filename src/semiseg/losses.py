"""Segmentation losses shared by every method.

All losses take logits ``(B, C, H, W)`` and integer targets ``(B, H, W)``; pixels equal to
``ignore_index`` contribute nothing. An optional per-pixel ``weight`` ``(B, H, W)`` scales each pixel's
contribution (UAPS's uncertainty weighting); a loss whose every pixel is ignored is exactly zero and
keeps its graph, so it can be summed with others.
"""

from __future__ import annotations

import math
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
    return nll_loss(logits.log_softmax(dim=1), target, ignore_index, weight, class_weights)


def nll_loss(
    log_probabilities: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int = 255,
    weight: torch.Tensor | None = None,
    class_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`cross_entropy` from ``log_probabilities (B, C, H, W)`` (a log-softmax computed once and shared).

    The sum over labeled pixels divided by their number (not by the sum of ``class_weights``); without a pixel
    ``weight`` the sum is reduced inside the kernel, so no per-pixel loss tensor (and no graph for it) is built.
    """
    valid_count = (target != ignore_index).sum().clamp_min(1).to(log_probabilities.dtype)
    if weight is None:
        total = F.nll_loss(log_probabilities, target, weight=class_weights, ignore_index=ignore_index, reduction="sum")
        return total / valid_count
    per_pixel = F.nll_loss(log_probabilities, target, weight=class_weights, ignore_index=ignore_index, reduction="none")
    return (per_pixel * weight).sum() / valid_count


def dice_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int = 255,
    weight: torch.Tensor | None = None,
    smooth: float = DICE_SMOOTH,
) -> torch.Tensor:
    """Soft Dice loss ``1 - mean_c (2|P_c ∩ Y_c| + s) / (|P_c| + |Y_c| + s)`` over all classes (background
    included, the SSL4MIS/UAPS convention), computed over the batch; ``weight`` scales each pixel."""
    return dice_from_probabilities(logits.softmax(dim=1), target, ignore_index, weight, smooth)


def dice_from_probabilities(
    probabilities: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int = 255,
    weight: torch.Tensor | None = None,
    smooth: float = DICE_SMOOTH,
) -> torch.Tensor:
    """:func:`dice_loss` from ``probabilities (B, C, H, W)`` (a softmax computed once and shared)."""
    valid, safe_target = _valid(target, ignore_index)
    pixel_weight = valid.to(probabilities.dtype)
    if weight is not None:
        pixel_weight = pixel_weight * weight
    pixel_weight = pixel_weight.unsqueeze(1)  # (B, 1, H, W)
    probs = probabilities * pixel_weight
    # the one-hot target built in the probabilities' dtype and layout (no int64 (B, H, W, C) intermediate)
    one_hot = torch.zeros_like(probabilities).scatter_(1, safe_target.unsqueeze(1), 1.0) * pixel_weight
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
    return ce_dice_from_log_probabilities(
        logits.log_softmax(dim=1), target, ignore_index, weight, class_weights, ce_weight, dice_weight
    )


def ce_dice_from_log_probabilities(
    log_probabilities: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int = 255,
    weight: torch.Tensor | None = None,
    class_weights: torch.Tensor | None = None,
    ce_weight: float = 0.5,
    dice_weight: float = 0.5,
    probabilities: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`ce_dice_loss` from one log-softmax ``(B, C, H, W)`` shared by both terms (and by a caller that needs
    it too, e.g. UAPS's uncertainty); ``probabilities`` = its ``exp`` when the caller has it already."""
    loss = log_probabilities.new_zeros(())
    if ce_weight:
        loss = loss + ce_weight * nll_loss(log_probabilities, target, ignore_index, weight, class_weights)
    if dice_weight:
        if probabilities is None:
            probabilities = log_probabilities.exp()
        loss = loss + dice_weight * dice_from_probabilities(probabilities, target, ignore_index, weight)
    return loss


def class_weight_tensor(class_weights: Sequence[float] | None, num_classes: int) -> torch.Tensor | None:
    if class_weights is None:
        return None
    if len(class_weights) != num_classes:
        raise ConfigError(
            f"method.loss.class_weights has {len(class_weights)} values for {num_classes} classes; give one per class"
        )
    return torch.tensor(list(class_weights), dtype=torch.float32)


# ---- partial labels: focal loss and its confidence-aware (SuperLoss) variant ----------------------


def focal_loss_per_pixel(
    logits: torch.Tensor,
    target: torch.Tensor,
    gamma: float = 3.0,
    ignore_index: int = 255,
    class_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Softmax focal loss of every pixel, ``-α_y (1 - p_y)^γ log p_y`` (Lin et al., ICCV 2017).

    ``logits (B, C, H, W)``, ``target (B, H, W)`` -> ``(B, H, W)``; ignored pixels are exactly 0. ``γ = 0``
    without class weights is the plain cross-entropy.
    """
    valid, safe_target = _valid(target, ignore_index)
    log_probs = logits.float().log_softmax(dim=1)
    log_p_target = log_probs.gather(1, safe_target.unsqueeze(1)).squeeze(1)
    loss = -((1.0 - log_p_target.exp()).clamp_min(0.0) ** gamma) * log_p_target
    if class_weights is not None:
        loss = loss * class_weights.to(loss)[safe_target]
    return loss * valid.to(loss.dtype)


def focal_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    gamma: float = 3.0,
    ignore_index: int = 255,
    class_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean softmax focal loss over the labeled pixels (0 with its graph when none is labeled)."""
    per_pixel = focal_loss_per_pixel(logits, target, gamma, ignore_index, class_weights)
    return per_pixel.sum() / (target != ignore_index).sum().clamp_min(1)


def lambert_w(x: torch.Tensor, iterations: int = 12) -> torch.Tensor:
    """Principal branch ``W0`` of the Lambert W function (``W e^W = x``) for ``x >= -1/e``, by Halley's method.

    Computed in float64 and returned in ``x``'s dtype; values below ``-1/e`` are clamped to it (``W = -1``).
    """
    z = x.detach().double().clamp_min(-math.exp(-1.0))
    # start: branch-point series near -1/e, log(1 + z) elsewhere (both below the root for z > 0 is fine)
    p = torch.sqrt((2.0 * (math.e * z + 1.0)).clamp_min(0.0))
    near_branch = -1.0 + p - p * p / 3.0 + 11.0 / 72.0 * p**3
    w = torch.where(z < 0.5, near_branch, torch.log1p(z))
    for _ in range(iterations):
        ew = torch.exp(w)
        f = w * ew - z
        denominator = ew * (w + 1.0) - (w + 2.0) * f / (2.0 * w + 2.0).clamp_min(1e-12)
        step = torch.where(denominator.abs() > 1e-300, f / denominator, torch.zeros_like(f))
        w = torch.where(w + 1.0 > 1e-9, w - step, w)
    return w.to(x.dtype)


def superloss_confidence(per_pixel_loss: torch.Tensor, tau: float | torch.Tensor, lam: float) -> torch.Tensor:
    """SuperLoss's optimal confidence ``σ* = exp(-W(½ max(-2/e, (ℓ - τ)/λ)))`` of each loss value (detached).

    Castells, Weinzaepfel, Revaud, "SuperLoss: A Generic Loss for Robust Curriculum Learning", NeurIPS 2020:
    easy samples (``ℓ < τ``) get ``σ > 1``, hard ones ``σ < 1``; ``σ = 1`` at ``ℓ = τ``.
    """
    beta = (per_pixel_loss.detach().double() - tau) / lam
    return torch.exp(-lambert_w(0.5 * beta.clamp_min(-2.0 / math.e))).to(per_pixel_loss.dtype)


def superloss(per_pixel_loss: torch.Tensor, tau: float | torch.Tensor, lam: float) -> torch.Tensor:
    """``(ℓ - τ) σ* + λ (log σ*)²`` elementwise, with the closed-form confidence ``σ*`` held constant.

    Holding ``σ*`` constant gives the exact gradient, because ``σ*`` minimises the expression (envelope theorem).
    """
    sigma = superloss_confidence(per_pixel_loss, tau, lam)
    return (per_pixel_loss - tau) * sigma + lam * torch.log(sigma) ** 2
