"""The fast loss path computes what the plain formulas compute: one log-softmax per decoder shared by CE, Dice and
UAPS's uncertainty, no per-pixel CE tensor without pixel weights, a one-hot built in the probabilities' dtype.
The reference below is the step as written before those changes (``F.cross_entropy`` with ``reduction="none"``,
Dice from ``softmax`` and ``F.one_hot``, the KL from its own log-softmax); loss values and every parameter's
gradient must agree to float64 round-off, for both uncertainty weightings, with ignored pixels and class weights.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from semiseg.losses import ce_dice_loss, cross_entropy, dice_loss
from semiseg.methods.uaps import mixing_weights
from test_uaps import batches, make_uaps

IGNORE = 255


def reference_cross_entropy(logits, target, weight=None, class_weights=None):
    per_pixel = F.cross_entropy(logits, target, weight=class_weights, ignore_index=IGNORE, reduction="none")
    valid = (target != IGNORE).to(per_pixel.dtype)
    if weight is not None:
        per_pixel = per_pixel * weight
    return per_pixel.sum() / valid.sum().clamp_min(1.0)


def reference_dice(logits, target, weight=None, smooth=1e-5):
    valid = target != IGNORE
    safe = torch.where(valid, target, torch.zeros_like(target))
    pixel_weight = valid.to(logits.dtype) if weight is None else valid.to(logits.dtype) * weight
    probs = logits.softmax(dim=1) * pixel_weight.unsqueeze(1)
    one_hot = F.one_hot(safe, logits.shape[1]).permute(0, 3, 1, 2).to(logits.dtype) * pixel_weight.unsqueeze(1)
    intersection = (probs * one_hot).sum((0, 2, 3))
    denominator = probs.sum((0, 2, 3)) + one_hot.sum((0, 2, 3))
    return 1.0 - ((2 * intersection + smooth) / (denominator + smooth)).mean()


def reference_seg_loss(logits, target, weight=None, class_weights=None):
    return 0.5 * reference_cross_entropy(logits, target, weight, class_weights) + 0.5 * reference_dice(
        logits, target, weight
    )


def reference_uaps_loss(module, labeled, unlabeled, class_weights=None):
    """The UAPS objective at full ramp: mean_k sup_k + w1 L_ups + w2 L_un, from the network's outputs."""
    supervised = torch.stack(
        [
            reference_seg_loss(item, labeled["mask"], None, class_weights)
            for item in module.net.forward_all(labeled["image"])
        ]
    ).mean()
    logits = module.net.forward_all(unlabeled["image"])
    log_probabilities = torch.stack([item.log_softmax(dim=1) for item in logits])
    log_mean = torch.logsumexp(log_probabilities, dim=0, keepdim=True) - math.log(len(logits))
    uncertainty = (log_mean.exp() * (log_mean - log_probabilities)).sum(dim=2)
    probabilities = torch.stack([item.softmax(dim=1) for item in logits])
    weights = mixing_weights(len(logits), module.mixing)
    pseudo = (weights.view(-1, 1, 1, 1, 1) * probabilities.detach()).sum(dim=0).argmax(dim=1)
    certainty = torch.exp(-uncertainty)
    if module.uncertainty_weighting == "pixel":
        ups = [reference_seg_loss(item, pseudo, certainty[k], class_weights) for k, item in enumerate(logits)]
    else:
        ups = [
            reference_seg_loss(item, pseudo, None, class_weights) * certainty[k].mean() for k, item in enumerate(logits)
        ]
    loss_un = uncertainty.mean(dim=(1, 2, 3)).mean()
    return supervised + module.ups_coefficient * torch.stack(ups).mean() + module.un_coefficient * loss_un


def gradients(module) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("weighting", ["pixel", "batch"])
@pytest.mark.parametrize("class_weights", [None, [0.5, 2.0, 1.0]])
def test_uaps_step_equals_the_plain_formulas(weighting: str, class_weights: list[float] | None) -> None:
    torch.manual_seed(0)
    options = {"loss": {"class_weights": class_weights}} if class_weights else {}
    module = make_uaps(uncertainty_weighting=weighting, rampup_length=0, **options).double().train()
    labeled, unlabeled = batches(size=16, batch=2)
    labeled = {"image": labeled["image"].double(), "mask": labeled["mask"].clone()}
    labeled["mask"][0, :4] = IGNORE  # some ignored pixels
    unlabeled = {"image": unlabeled["image"].double()}
    weights = None if class_weights is None else torch.tensor(class_weights, dtype=torch.float64)

    torch.manual_seed(1)
    loss, _ = module.training_losses(labeled, unlabeled)
    loss.backward()
    fast = gradients(module)
    module.zero_grad(set_to_none=True)
    torch.manual_seed(1)  # the same perturbation and mixing draws, in the same order
    expected = reference_uaps_loss(module, labeled, unlabeled, weights)
    expected.backward()
    plain = gradients(module)

    assert loss.item() == pytest.approx(expected.item(), rel=1e-12, abs=1e-12)
    assert fast.keys() == plain.keys() and len(fast) > 10
    for name in fast:
        torch.testing.assert_close(fast[name], plain[name], rtol=1e-9, atol=1e-12, msg=name)


def test_the_shared_losses_equal_the_plain_ones_in_float32() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 8, 8, generator=generator, requires_grad=True)
    target = torch.randint(0, 4, (2, 8, 8), generator=generator)
    target[1, :3] = IGNORE
    weight = torch.rand(2, 8, 8, generator=generator)
    for pixel_weight in (None, weight):
        torch.testing.assert_close(cross_entropy(logits, target, IGNORE, pixel_weight),
                                   reference_cross_entropy(logits, target, pixel_weight))  # fmt: skip
        torch.testing.assert_close(dice_loss(logits, target, IGNORE, pixel_weight),
                                   reference_dice(logits, target, pixel_weight))  # fmt: skip
        torch.testing.assert_close(ce_dice_loss(logits, target, IGNORE, pixel_weight),
                                   reference_seg_loss(logits, target, pixel_weight))  # fmt: skip
    everything_ignored = torch.full_like(target, IGNORE)
    loss = ce_dice_loss(logits, everything_ignored, IGNORE)
    assert loss.item() == 0.0 and loss.requires_grad  # exactly zero, and still part of the graph
