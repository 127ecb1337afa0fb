"""UCC: uncertainty-guided cross-head co-training (Fan, Gao, Jin, Jiang, "UCC: Uncertainty guided Cross-head
Co-training for Semi-Supervised Semantic Segmentation", CVPR 2022).

One shared encoder and two segmentation heads (decoders of the same architecture, initialised
independently). Both heads are supervised on the labeled images. On an unlabeled image, the weak view
``image`` gives each head's hard pseudo-labels (detached); the strong view ``image_strong`` is what the heads
are trained on, each with the *other* head's pseudo-labels (cross-head co-training: weak supervises strong):

    L_u = ℓ(p1_strong, ŷ2_weak) + ℓ(p2_strong, ŷ1_weak),      L = L_sup(head 1) + L_sup(head 2) + λ·ramp·L_u

**Cross-set CutMix** (``mixing: cross_set_cutmix``). Inside each unlabeled image's box ``cutmix_box`` the
strong view takes the pixels of a labeled image of the batch (the unlabeled image i pairs with labeled image
``i mod B_l``), and the target there is that image's ground truth. This is the box form of the paper's
Dynamic Cross-Set Copy-Paste (DCSCP), which pastes the *pixels of sampled classes* of labeled images onto
unlabeled ones, sampling classes by their running confidence; the class-aware, dynamic sampling is not
implemented (the issue and the UAPS comparison code both use boxes).

**Uncertainty guidance** (``uncertainty_weighting``; the paper's Uncertainty Guided Re-weight Module,
UGRM). ``kl``: a pixel's pseudo-label is down-weighted by how much the two heads disagree there,
``D = KL(p_peer_weak || p_own_strong)``, with weight ``exp(-D)`` and ``mean(D)`` added as a regulariser
(the uncertainty-rectified pseudo-label loss of Zheng & Yang, IJCV 2021). ``entropy``: weight
``1 - H(p_peer_weak) / ln C``. ``none``: plain cross pseudo supervision. *Our reading:* which two
predictions enter ``D`` and the exact re-weighting formula are our reading of UGRM (the paper's text was
not at hand when this was written); ground-truth pixels of the pasted box get weight 1.

**Where the public re-implementation differs** (the UAPS authors' comparison code, ``UCC/UCC_train.py``):
it pastes the labeled box onto *both* views and takes pseudo-labels in the box from the prediction, not the
ground truth (box of half the image, p = 0.3; plus in-batch CutMix of labeled images, p = 0.2); its ``D``
compares one head's weak with the other head's strong prediction; it multiplies an already averaged
CE + Dice by the mean weight (image-level, not per pixel) — ``pseudo_loss: ce_dice`` gives its loss form;
its λ is 0.1, ramped as in UAPS; and its second head always decodes FeatureNoise-perturbed encoder features
(``x + x·u``, ``u ~ U(-0.3, 0.3)``; ``head2_perturbation: noise``), on labeled, weak and strong images alike,
while head 1 decodes the clean features (the default ``none`` gives both heads the clean features).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import nn

from semiseg.errors import check_choice
from semiseg.losses import ce_dice_loss, cross_entropy
from semiseg.methods.base import Batch, LossTerms, SemiSupervisedModule, _plain
from semiseg.methods.consistency import entropy
from semiseg.methods.mixing import mix
from semiseg.methods.pseudo_labels import kl_discrepancy, ramp_length
from semiseg.models.perturbations import PerturbedFeatures, make_perturbation

MIXING = ("cross_set_cutmix", "none")
UNCERTAINTY = ("kl", "entropy", "none")
ENTROPY_EPS = 1e-12  # guard of log 0 in the entropy weighting
PSEUDO_LOSSES = ("ce", "ce_dice")


def uncertainty_weighted_pseudo_loss(
    logits: torch.Tensor,
    peer_weak_logits: torch.Tensor,
    target: torch.Tensor,
    certain: torch.Tensor | None = None,
    uncertainty: str = "kl",
    pseudo_loss: str = "ce",
    ignore_index: int = 255,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One head's cross pseudo-supervision loss and the mean pixel weight.

    Args:
        logits: the head's prediction on the (mixed) strong view ``(B, C, H, W)``.
        peer_weak_logits: the other head's prediction on the weak view ``(B, C, H, W)`` (detached here);
            where the strong view was mixed, the caller passes logits whose pixels match the target's source.
        target: ``(B, H, W)`` pseudo-labels (ground truth inside pasted boxes); ``ignore_index`` skips pixels.
        certain: ``(B, H, W)`` bool, pixels that get weight 1 whatever the uncertainty (ground truth).
        uncertainty: ``kl``, ``entropy`` or ``none``.
        pseudo_loss: ``ce`` or ``ce_dice`` (0.5·(CE + Dice)).

    Returns:
        ``(loss, mean_weight)``; the loss is 0 (not NaN) when every pixel is ignored.
    """
    check_choice("method.uncertainty_weighting", uncertainty, UNCERTAINTY)
    check_choice("method.pseudo_loss", pseudo_loss, PSEUDO_LOSSES)
    valid = target != ignore_index
    regulariser = logits.new_zeros(())
    if uncertainty == "none":
        weight = torch.ones_like(target, dtype=logits.dtype)
    elif uncertainty == "kl":
        discrepancy = kl_discrepancy(peer_weak_logits, logits)
        weight = torch.exp(-discrepancy)
        counted = valid if certain is None else valid & ~certain
        regulariser = (discrepancy * counted).sum() / valid.sum().clamp_min(1)
    elif uncertainty == "entropy":
        prob = peer_weak_logits.detach().softmax(dim=1)
        weight = (1.0 - entropy(prob, eps=ENTROPY_EPS) / math.log(prob.shape[1])).clamp(0.0, 1.0)
    if certain is not None:
        weight = torch.where(certain, torch.ones_like(weight), weight)
    if pseudo_loss == "ce":
        loss = cross_entropy(logits, target, ignore_index, weight=weight)
    else:  # ce_dice
        loss = ce_dice_loss(logits, target, ignore_index, weight=weight)
    mean_weight = (weight.detach() * valid).sum() / valid.sum().clamp_min(1)
    return loss + regulariser, mean_weight


class UCC(SemiSupervisedModule):
    """Uncertainty-guided cross-head co-training.

    Args:
        weight: λ, the weight of the cross-head loss after the ramp-up.
        rampup_steps: sigmoid ramp-up length in steps (or a fraction of ``trainer.max_steps`` in (0, 1)).
        mixing: ``cross_set_cutmix`` (paste labeled boxes into the strong unlabeled view) or ``none``.
        uncertainty_weighting: ``kl``, ``entropy`` or ``none`` (see the module docstring).
        pseudo_loss: ``ce`` (our reading of the paper) or ``ce_dice`` (the UAPS re-implementation).
        head2_perturbation: perturbation of the encoder features that head 2 decodes, ``none`` or any name
            of :func:`~semiseg.models.perturbations.make_perturbation` (the UAPS re-implementation: ``noise``).
        head2_perturbation_options: its keyword arguments (e.g. ``{uniform_range: 0.3}``).
    """

    unlabeled_views: ClassVar[tuple[str, ...]] = ("image", "image_strong", "cutmix_box")

    def __init__(
        self,
        weight: float = 1.0,
        rampup_steps: float = 0,
        mixing: str = "cross_set_cutmix",
        uncertainty_weighting: str = "kl",
        pseudo_loss: str = "ce",
        head2_perturbation: str = "none",
        head2_perturbation_options: dict[str, Any] | None = None,
        **base: Any,
    ) -> None:
        check_choice("method.mixing", mixing, MIXING)
        check_choice("method.uncertainty_weighting", uncertainty_weighting, UNCERTAINTY)
        check_choice("method.pseudo_loss", pseudo_loss, PSEUDO_LOSSES)
        self.weight = weight
        self.rampup_steps = rampup_steps
        self.mixing = mixing
        self.uncertainty_weighting = uncertainty_weighting
        self.pseudo_loss = pseudo_loss
        self.head2_perturbation_name = str(head2_perturbation)
        self.head2_perturbation_options = dict(_plain(head2_perturbation_options) or {})
        super().__init__(**base)

    def configure_networks(self) -> None:
        self.net = self.build_network()  # encoder + head 1 (the inference network)
        self.head2 = self.net.make_decoder()
        perturbation = make_perturbation(self.head2_perturbation_name, **self.head2_perturbation_options)
        self.head2_features = PerturbedFeatures(perturbation)  # identity in eval mode and for "none"

    @property
    def inference_network(self) -> nn.Module:
        return self.net

    def both_heads(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits of head 1 and head 2 ``(B, C, H, W)``; the encoder runs once, head 2 reads its features
        through ``head2_perturbation``."""
        features = self.net.encode(image)
        return self.net.decode(features), self.net.decode(self.head2_features(features), self.head2)

    def supervised_loss(self, labeled: Batch) -> tuple[torch.Tensor, LossTerms]:
        logits1, logits2 = self.both_heads(labeled["image"])
        loss1, loss2 = self.seg_loss(logits1, labeled["mask"]), self.seg_loss(logits2, labeled["mask"])
        return loss1 + loss2, {"loss_sup_head1": loss1, "loss_sup_head2": loss2}

    def unsupervised_loss(self, unlabeled: Batch, labeled: Batch) -> tuple[torch.Tensor, LossTerms]:
        with torch.no_grad():
            weak1, weak2 = self.both_heads(unlabeled["image"])
        pseudo1, pseudo2 = weak1.argmax(dim=1), weak2.argmax(dim=1)
        strong = unlabeled["image_strong"]
        certain = None
        if self.mixing == "cross_set_cutmix":
            partner = torch.arange(strong.shape[0], device=strong.device) % labeled["image"].shape[0]
            boxes = unlabeled["cutmix_box"].bool()
            strong = mix(strong, labeled["image"][partner], boxes)
            pseudo1 = mix(pseudo1, labeled["mask"][partner], boxes)
            pseudo2 = mix(pseudo2, labeled["mask"][partner], boxes)
            certain = boxes
        strong1, strong2 = self.both_heads(strong)
        options = {"uncertainty": self.uncertainty_weighting, "pseudo_loss": self.pseudo_loss}
        loss1, weight1 = uncertainty_weighted_pseudo_loss(
            strong1, weak2, pseudo2, certain, ignore_index=self.ignore_index, **options
        )
        loss2, weight2 = uncertainty_weighted_pseudo_loss(
            strong2, weak1, pseudo1, certain, ignore_index=self.ignore_index, **options
        )
        loss_cross = loss1 + loss2
        max_steps = self.trainer.max_steps if self._trainer is not None else None
        weight = self.weight * self.rampup(ramp_length(self.rampup_steps, max_steps))
        return weight * loss_cross, {
            "loss_cross_head": loss_cross,
            "weight_cross_head": torch.tensor(weight),
            "pixel_weight_mean": (weight1 + weight2) / 2,
        }
