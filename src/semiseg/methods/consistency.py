"""Consistency terms shared by the teacher-student and co-training methods (Mean Teacher, UA-MT, DCT, ...).

Every function works per pixel: probabilities or logits ``(B, C, H, W)`` in, a map ``(B, H, W)`` out, so
that a method can mask or weight pixels before reducing with :func:`masked_mean`. Reductions never divide
by zero: a term whose every pixel is masked out is exactly zero (and keeps its graph).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from semiseg.errors import check_choice

CLASS_REDUCTIONS = ("mean", "sum", "half_sum")


def softmax_mse(
    student_logits: torch.Tensor, teacher_probs: torch.Tensor, class_reduction: str = "mean"
) -> torch.Tensor:
    """Squared distance between ``softmax(student_logits)`` and ``teacher_probs`` at each pixel.

    Args:
        student_logits: ``(B, C, H, W)`` logits (gradients flow through them).
        teacher_probs: ``(B, C, H, W)`` target probabilities (use detached ones).
        class_reduction: ``mean`` over the ``C`` classes (what the Mean Teacher and SSL4MIS code compute),
            ``sum`` (the squared L2 norm written in the papers) or ``half_sum`` (``sum / 2``: the UA-MT code's
            ``sum(mask * d) / (2 * sum(mask))``, written for two classes; ``C/2`` times ``mean``).

    Returns:
        ``(B, H, W)`` per-pixel distance.
    """
    check_choice("method.class_reduction", class_reduction, CLASS_REDUCTIONS)
    squared = (student_logits.softmax(dim=1) - teacher_probs) ** 2
    if class_reduction == "mean":
        return squared.mean(dim=1)
    if class_reduction == "sum":
        return squared.sum(dim=1)
    return squared.sum(dim=1) / 2  # half_sum


def masked_mean(per_pixel: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``sum(mask * x) / sum(mask)`` over all pixels; the plain mean without a mask; 0 when the mask is empty.

    ``per_pixel``: ``(B, H, W)``; ``mask``: ``(B, H, W)`` bool or float weights.
    """
    if mask is None:
        return per_pixel.mean()
    mask = mask.to(per_pixel.dtype)
    return (per_pixel * mask).sum() / mask.sum().clamp_min(torch.finfo(per_pixel.dtype).tiny)


def entropy(probs: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Shannon entropy ``-sum_c p_c log(p_c + eps)`` of ``probs (B, C, H, W)`` -> ``(B, H, W)``, in nats.

    ``eps`` is the UA-MT code's guard against ``log 0``; the maximum is ``ln C`` (uniform prediction).
    """
    return -(probs * (probs + eps).log()).sum(dim=1)


def mean_prediction_entropy(samples: torch.Tensor) -> torch.Tensor:
    """Predictive entropy of ``T`` stochastic predictions: ``samples (T, B, C, H, W)`` probabilities ->
    the entropy of their mean, ``(B, H, W)`` (UA-MT's uncertainty)."""
    return entropy(samples.mean(dim=0))


def js_divergence(logits1: torch.Tensor, logits2: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon divergence ``H((p1 + p2) / 2) - (H(p1) + H(p2)) / 2`` at each pixel, in nats.

    Computed from log-probabilities, so it stays finite for saturated predictions; it lies in ``[0, ln 2]``
    and is exactly 0 for identical predictions. ``logits1``, ``logits2``: ``(B, C, H, W)`` -> ``(B, H, W)``.
    """
    log_p1, log_p2 = logits1.log_softmax(dim=1), logits2.log_softmax(dim=1)
    log_mean = torch.logaddexp(log_p1, log_p2) - math.log(2.0)
    p1, p2 = log_p1.exp(), log_p2.exp()
    kl1 = (p1 * (log_p1 - log_mean)).sum(dim=1)
    kl2 = (p2 * (log_p2 - log_mean)).sum(dim=1)
    return (0.5 * (kl1 + kl2)).clamp_min(0.0)  # the same quantity, written as the mean KL to the mixture


def soft_cross_entropy(target_probs: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """``H(q, p) = -sum_c q_c log p_c``, ``p = softmax(logits)``, per pixel: ``(B, C, H, W)`` -> ``(B, H, W)``."""
    return -(target_probs * logits.log_softmax(dim=1)).sum(dim=1)


def gaussian_input_noise(image: torch.Tensor, std: float, clip: float) -> torch.Tensor:
    """``image + clamp(N(0, std^2), -clip, clip)``, the input noise of the Mean Teacher / UA-MT code."""
    if std <= 0:
        return image
    return image + (torch.randn_like(image) * std).clamp(-clip, clip)


def fgsm_direction(
    inputs: list[torch.Tensor], logits: list[torch.Tensor], targets: list[torch.Tensor], ignore_index: int
) -> list[torch.Tensor]:
    """``sign(grad_x CE(f(x), y))`` for each input, from logits already computed with ``x.requires_grad``.

    Reusing the training forward pass avoids a second one; only the input gradients are computed
    (``torch.autograd.grad``), so nothing accumulates in the parameters' ``.grad``.

    Args:
        inputs: images ``(B_i, C, H, W)`` that require grad.
        logits: the network's logits on each of them ``(B_i, K, H, W)``.
        targets: labels ``(B_i, H, W)`` to move away from (true masks, or the network's own argmax).
        ignore_index: target value of pixels that do not count.

    Returns:
        ``(B_i, C, H, W)`` signs, detached.
    """
    loss = sum(
        F.cross_entropy(logit, target, ignore_index=ignore_index, reduction="sum")
        for logit, target in zip(logits, targets, strict=True)
    )
    gradients = torch.autograd.grad(loss, inputs, retain_graph=True, allow_unused=True)
    return [
        torch.zeros_like(x) if grad is None else grad.sign().detach() for x, grad in zip(inputs, gradients, strict=True)
    ]


def fgsm(
    network: Callable[[torch.Tensor], torch.Tensor],
    image: torch.Tensor,
    target: torch.Tensor,
    epsilon: float,
    ignore_index: int = 255,
) -> torch.Tensor:
    """Fast gradient sign adversarial example ``x + epsilon * sign(grad_x CE(network(x), target))``, detached.

    A stand-alone version of :func:`fgsm_direction` that runs its own forward pass.
    """
    x = image.detach().requires_grad_(True)
    with torch.enable_grad():
        (direction,) = fgsm_direction([x], [network(x)], [target], ignore_index)
    return (image + epsilon * direction).detach()
