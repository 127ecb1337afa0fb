"""FixMatch for segmentation (Sohn et al., "FixMatch: Simplifying Semi-Supervised Learning with Consistency
and Confidence", NeurIPS 2020), in the form the UniMatch paper uses as its baseline (Yang et al., CVPR 2023).

Each unlabeled image comes as a weak view ``image`` and a strong view ``image_strong`` (same geometry,
strong photometric changes on top) plus a CutMix box ``cutmix_box``. The network's prediction on the weak
view, detached, gives per-pixel pseudo-labels and confidences. Inside its box the strong view takes the
pixels of another unlabeled image of the batch (the batch rolled by one), and its targets are mixed the same
way. The loss is the cross-entropy on pixels whose confidence reaches ``threshold`` (0.95):

    L = (L_x + weight · L_s) / 2          (UniMatch's FixMatch; weight = λ_u = 1)

Differences from the UniMatch code: its CutMix partner comes from a second unlabeled loader, ours from the
same batch (rolled); its supervised loss is CE, ours the suite's shared 0.5·(CE + Dice). ``rampup_steps``
(0 in the paper) lets a protocol ramp the unsupervised weight.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from semiseg.methods.base import Batch, LossTerms, SemiSupervisedModule
from semiseg.methods.mixing import mix, rolled
from semiseg.methods.pseudo_labels import (
    check_threshold,
    confident_cross_entropy,
    cutmix_pseudo_targets,
    hard_pseudo_labels,
    ramp_length,
)


class FixMatch(SemiSupervisedModule):
    """FixMatch with CutMix in the strong view.

    Args:
        threshold: τ, the softmax confidence a pseudo-label needs to count (0.95).
        weight: λ_u, the weight of the unsupervised loss (1).
        rampup_steps: sigmoid ramp-up of λ_u in steps (or fraction of max_steps); 0: none (the paper).
        halve_total: divide the total loss by 2 as the UniMatch code does, ``(L_x + L_s) / 2``.
    """

    unlabeled_views: ClassVar[tuple[str, ...]] = ("image", "image_strong", "cutmix_box")

    def __init__(
        self,
        threshold: float = 0.95,
        weight: float = 1.0,
        rampup_steps: float = 0,
        halve_total: bool = True,
        **base: Any,
    ) -> None:
        check_threshold(threshold)
        self.threshold = threshold
        self.weight = weight
        self.rampup_steps = rampup_steps
        self.total_scale = 0.5 if halve_total else 1.0
        super().__init__(**base)

    def unsupervised_weight(self) -> float:
        max_steps = self.trainer.max_steps if self._trainer is not None else None
        return self.weight * self.rampup(ramp_length(self.rampup_steps, max_steps))

    def supervised_loss(self, labeled: Batch) -> tuple[torch.Tensor, LossTerms]:
        loss_x = self.seg_loss(self.net(labeled["image"]), labeled["mask"])
        return self.total_scale * loss_x, {"loss_x": loss_x}

    def strong_loss(self, weak_logits: torch.Tensor, strong_image: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """Loss of one CutMixed strong view against the weak view's confident pseudo-labels.

        ``weak_logits (B, C, H, W)``, ``strong_image (B, C_in, H, W)``, ``boxes (B, H, W)``.
        """
        confidence, label = hard_pseudo_labels(weak_logits)
        mixed_label, mixed_confidence = cutmix_pseudo_targets(label, confidence, boxes)
        strong_logits = self.net(mix(strong_image, rolled(strong_image), boxes))
        return confident_cross_entropy(strong_logits, mixed_label, mixed_confidence, self.threshold, self.ignore_index)

    def diagnostic_pseudo_labels(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The weak view's argmax, used where its confidence reaches ``threshold`` (also UniMatch's)."""
        confidence, label = hard_pseudo_labels(self.net(image))
        return label, confidence >= self.threshold

    def unsupervised_loss(self, unlabeled: Batch, labeled: Batch) -> tuple[torch.Tensor, LossTerms]:
        with torch.no_grad():
            weak_logits = self.net(unlabeled["image"])
        loss_s = self.strong_loss(weak_logits, unlabeled["image_strong"], unlabeled["cutmix_box"])
        weight = self.unsupervised_weight()
        confident = (hard_pseudo_labels(weak_logits)[0] >= self.threshold).float().mean()
        return self.total_scale * weight * loss_s, {
            "loss_s": loss_s,
            "weight_unsup": torch.tensor(weight),
            "confident_fraction": confident,
        }
