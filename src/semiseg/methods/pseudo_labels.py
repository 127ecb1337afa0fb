"""Pseudo-label losses shared by FixMatch, UniMatch and UCC, and the ramp length rule of their configs.

All functions take logits ``(B, C, H, W)`` and integer targets ``(B, H, W)``; pixels whose target equals
``ignore_index`` contribute nothing, and a loss whose every pixel is ignored is exactly zero (never NaN).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from semiseg.errors import ConfigError
from semiseg.methods.mixing import mix, rolled


def ramp_length(rampup_steps: float, max_steps: int | None) -> float:
    """The sigmoid ramp-up length in optimisation steps.

    ``rampup_steps >= 1`` is a number of steps; a value in ``(0, 1)`` is a fraction of ``max_steps``
    (CCT ramps over the first 10% of training); ``0`` means no ramp.
    """
    if rampup_steps < 0:
        raise ConfigError(f"method.rampup_steps={rampup_steps} must be >= 0 (steps, or a fraction of max_steps)")
    if 0 < rampup_steps < 1:
        if not max_steps or max_steps <= 0:
            raise ConfigError(
                f"method.rampup_steps={rampup_steps} is a fraction of trainer.max_steps, which is not set; "
                "give rampup_steps in steps"
            )
        return rampup_steps * max_steps
    return float(rampup_steps)


def check_threshold(threshold: float) -> None:
    if not 0.0 <= threshold <= 1.0:
        raise ConfigError(f"method.threshold={threshold} must lie in [0, 1] (a softmax confidence)")


def hard_pseudo_labels(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Detached ``(confidence, label)``, each ``(B, H, W)``: the max softmax probability and its class."""
    confidence, label = logits.detach().softmax(dim=1).max(dim=1)
    return confidence, label


def confident_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    confidence: torch.Tensor,
    threshold: float,
    ignore_index: int = 255,
) -> torch.Tensor:
    """FixMatch/UniMatch loss: CE on pixels whose pseudo-label confidence reaches ``threshold``.

    As in the UniMatch code, the sum over confident pixels is divided by the number of *valid* pixels (not
    ignored), so the loss shrinks when few pixels are confident; every pixel below the threshold gives 0.
    """
    valid = target != ignore_index
    safe_target = torch.where(valid, target, torch.zeros_like(target))
    per_pixel = F.cross_entropy(logits, safe_target, reduction="none")
    keep = (valid & (confidence >= threshold)).to(per_pixel.dtype)
    return (per_pixel * keep).sum() / valid.sum().clamp_min(1)


def cutmix_pseudo_targets(
    label: torch.Tensor, confidence: torch.Tensor, boxes: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets of a strong view that took the rolled batch's pixels inside ``boxes``.

    ``label``/``confidence`` ``(B, H, W)`` of the weak views; returns them mixed like the images.
    """
    return mix(label, rolled(label), boxes), mix(confidence, rolled(confidence), boxes)


def kl_discrepancy(target_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Per-pixel ``KL(softmax(target) || softmax(logits))`` ``(B, H, W)``; ``target_logits`` is detached."""
    target_log_prob = target_logits.detach().log_softmax(dim=1)
    return (target_log_prob.exp() * (target_log_prob - logits.log_softmax(dim=1))).sum(dim=1)
