"""Cross pseudo supervision (Chen, Yuan, Zeng, Wang, "Semi-Supervised Semantic Segmentation with Cross
Pseudo Supervision", CVPR 2021).

Two networks of the same architecture with different initialisations. Each is supervised on the labeled
images and trained with cross-entropy on the *other* network's hard pseudo-labels (argmax, detached):

    L_cps = CE(p1, argmax p2) + CE(p2, argmax p1),    L = L_sup + λ (L_cps^u + L_cps^l)

on the unlabeled images (``L_cps^u``) and, as in the paper, on the labeled ones too (``L_cps^l``). The
paper's λ is 1.5 on PASCAL VOC (6 on Cityscapes) with no ramp-up; ``rampup_steps`` adds a sigmoid ramp-up
(the UAPS protocol: λ = 0.1 ramped over training). At inference the first network runs
(``inference: first``) or the mean of both softmaxes (``ensemble``).

Differences between the paper, its official code (TorchSemiSeg) and the UAPS comparison code, each an
option with the paper as the default:

* ``combine: sum`` — the paper's ``L_cps^u + L_cps^l``, each averaged over its own pixels; ``concat`` is the
  official code's one CE over the concatenated labeled + unlabeled batch.
* ``pseudo_loss: ce`` — the paper; ``ce_dice`` is the UAPS comparison code's ``0.5 (CE + Dice)`` on the
  pseudo-labels.
* ``mixing: cutmix`` — the paper's "CPS + CutMix" variant (its headline results): pseudo-labels come from
  the unmixed unlabeled images, the networks predict the CutMix of two of them, and the labels are mixed
  with the same box. The official code draws three boxes covering 25–50 % of the image; here one box per
  image with area in ``cutmix.area`` (``random_boxes``), partnered with the next image of the batch. The
  official CutMix script applies no CPS on labeled images (set ``cps_on_labeled: false`` to match).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from semiseg.errors import check_choice
from semiseg.losses import ce_dice_loss, cross_entropy
from semiseg.methods.base import Batch, LossTerms
from semiseg.methods.mixing import mix, random_boxes, rolled
from semiseg.methods.two_networks import TWO_NETWORK_INFERENCE, TwoNetworkModule

COMBINE_MODES = ("sum", "concat")
PSEUDO_LOSSES = ("ce", "ce_dice")
MIXING_MODES = ("none", "cutmix")


class CPS(TwoNetworkModule):
    """Cross pseudo supervision.

    Args:
        weight: λ, the CPS loss weight at the end of the ramp-up.
        rampup_steps: sigmoid ramp-up length of λ, in optimisation steps (0: no ramp, the paper).
        cps_on_labeled: also apply the CPS loss to the labeled images (the paper's default).
        combine: ``sum`` (paper) or ``concat`` (official code) of the labeled and unlabeled CPS terms.
        pseudo_loss: ``ce`` (paper) or ``ce_dice`` (UAPS comparison code) on the pseudo-labels.
        mixing: ``none`` or ``cutmix`` (the paper's CutMix variant) on the unlabeled images.
        cutmix: ``prob``, ``area``, ``aspect`` of the CutMix boxes (see :func:`random_boxes`).
        inference: ``first`` (network 1) or ``ensemble`` (mean softmax of both).
    """

    def __init__(
        self,
        weight: float = 1.5,
        rampup_steps: float = 0,
        cps_on_labeled: bool = True,
        combine: str = "sum",
        pseudo_loss: str = "ce",
        mixing: str = "none",
        cutmix: Mapping[str, Any] | None = None,
        inference: str = "first",
        **base: Any,
    ) -> None:
        self.weight = weight
        self.rampup_steps = rampup_steps
        self.cps_on_labeled = cps_on_labeled
        self.combine = check_choice("method.combine", combine, COMBINE_MODES)
        self.pseudo_loss = check_choice("method.pseudo_loss", pseudo_loss, PSEUDO_LOSSES)
        self.mixing = check_choice("method.mixing", mixing, MIXING_MODES)
        self.cutmix = {"prob": 1.0, "area": (0.25, 0.5), "aspect": (0.3, 1 / 0.3), **dict(cutmix or {})}
        self.inference = check_choice("method.inference", inference, TWO_NETWORK_INFERENCE)
        super().__init__(**base)

    def supervised_loss(self, labeled: Batch) -> tuple[torch.Tensor, LossTerms]:
        self._labeled_logits = (self.net(labeled["image"]), self.net2(labeled["image"]))
        first = self.seg_loss(self._labeled_logits[0], labeled["mask"])
        second = self.seg_loss(self._labeled_logits[1], labeled["mask"])
        return first + second, {"loss_sup_net1": first, "loss_sup_net2": second}

    def pseudo_supervision(self, logits: torch.Tensor, pseudo: torch.Tensor) -> torch.Tensor:
        """The loss of ``logits (B, C, H, W)`` against hard pseudo-labels ``(B, H, W)``."""
        if self.pseudo_loss == "ce":
            return cross_entropy(logits, pseudo, self.ignore_index)
        return ce_dice_loss(logits, pseudo, self.ignore_index)

    def cross_pseudo_loss(
        self,
        logits1: torch.Tensor,
        logits2: torch.Tensor,
        pseudo1: torch.Tensor | None = None,
        pseudo2: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``loss(logits1, pseudo2) + loss(logits2, pseudo1)``; pseudo-labels default to the detached argmax."""
        pseudo1 = logits1.detach().argmax(1) if pseudo1 is None else pseudo1
        pseudo2 = logits2.detach().argmax(1) if pseudo2 is None else pseudo2
        return self.pseudo_supervision(logits1, pseudo2) + self.pseudo_supervision(logits2, pseudo1)

    def cutmix_logits(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Both networks' logits on CutMixed images and both networks' mixed pseudo-labels."""
        batch_size, _, height, width = image.shape
        boxes = random_boxes(batch_size, height, width, device=image.device, **self.cutmix)
        with torch.no_grad():
            plain1, plain2 = self.net(image), self.net2(image)
            pseudo1 = mix(plain1, rolled(plain1), boxes).argmax(1)
            pseudo2 = mix(plain2, rolled(plain2), boxes).argmax(1)
        mixed = mix(image, rolled(image), boxes)
        return self.net(mixed), self.net2(mixed), pseudo1, pseudo2

    def unsupervised_loss(self, unlabeled: Batch, labeled: Batch) -> tuple[torch.Tensor, LossTerms]:
        image = unlabeled["image"]
        if self.mixing == "cutmix":
            logits1, logits2, pseudo1, pseudo2 = self.cutmix_logits(image)
        else:
            logits1, logits2 = self.net(image), self.net2(image)
            pseudo1 = pseudo2 = None
        if self.cps_on_labeled and self.combine == "concat":
            labeled1, labeled2 = self._labeled_logits
            pseudo1 = logits1.detach().argmax(1) if pseudo1 is None else pseudo1
            pseudo2 = logits2.detach().argmax(1) if pseudo2 is None else pseudo2
            pseudo1 = torch.cat([labeled1.detach().argmax(1), pseudo1])
            pseudo2 = torch.cat([labeled2.detach().argmax(1), pseudo2])
            loss_cps = self.cross_pseudo_loss(
                torch.cat([labeled1, logits1]), torch.cat([labeled2, logits2]), pseudo1, pseudo2
            )
            terms: LossTerms = {}
        else:
            loss_cps = loss_unlabeled = self.cross_pseudo_loss(logits1, logits2, pseudo1, pseudo2)
            terms = {"loss_cps_unlabeled": loss_unlabeled}
            if self.cps_on_labeled:
                loss_labeled = self.cross_pseudo_loss(*self._labeled_logits)
                loss_cps = loss_cps + loss_labeled
                terms["loss_cps_labeled"] = loss_labeled
        weight = self.weight * self.rampup(self.rampup_steps)
        return weight * loss_cps, {"loss_cps": loss_cps, "weight_cps": torch.tensor(weight), **terms}
