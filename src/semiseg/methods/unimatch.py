"""UniMatch (Yang, Qi, Feng, Zhang, Shi, "Revisiting Weak-to-Strong Consistency in Semi-Supervised Semantic
Segmentation", CVPR 2023).

FixMatch (see :mod:`semiseg.methods.fixmatch`) widened two ways:

* image-level: two strong views ``image_strong`` and ``image_strong2``, each CutMixed with its own box
  (``cutmix_box``, ``cutmix_box2``), both supervised by the weak view's pseudo-labels;
* feature-level: the encoder features of the weak view go through ``Dropout2d(0.5)`` (every level of the
  U-Net's features, as UniMatch perturbs both DeepLab feature maps it decodes) and the *same* decoder; this
  prediction is supervised by the weak view's clean pseudo-labels.

Only pixels whose weak-view confidence reaches ``threshold`` (0.95) count. The total loss is

    L = (L_x + weight · (0.25 · L_s1 + 0.25 · L_s2 + 0.5 · L_fp)) / 2          (weight = 1 in the paper)

Differences from the official code: the CutMix partner is the batch rolled by one (the code draws a second
unlabeled batch); the supervised loss is the suite's shared 0.5·(CE + Dice) instead of CE; the weak view is
forwarded without the labeled images in the same batch (BatchNorm sees them separately).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from semiseg.errors import ConfigError
from semiseg.methods.base import Batch, LossTerms
from semiseg.methods.fixmatch import FixMatch
from semiseg.methods.pseudo_labels import confident_cross_entropy, hard_pseudo_labels
from semiseg.models.perturbations import ChannelDropout, PerturbedFeatures


class UniMatch(FixMatch):
    """UniMatch: FixMatch with two strong views and a feature-perturbation stream.

    Args:
        threshold: τ, the pseudo-label confidence threshold (0.95).
        weight: scales the whole unsupervised part (1 in the paper).
        rampup_steps: sigmoid ramp-up of ``weight`` (0 in the paper).
        feature_dropout: p of the ``Dropout2d`` on the weak view's features (0.5).
        loss_weights: weights of ``L_s1``, ``L_s2``, ``L_fp`` (0.25, 0.25, 0.5).
        halve_total: divide the total by 2 as the paper does.
    """

    unlabeled_views: ClassVar[tuple[str, ...]] = (
        "image",
        "image_strong",
        "image_strong2",
        "cutmix_box",
        "cutmix_box2",
    )

    def __init__(
        self,
        feature_dropout: float = 0.5,
        loss_weights: Sequence[float] = (0.25, 0.25, 0.5),
        **fixmatch: Any,
    ) -> None:
        if not 0.0 <= feature_dropout < 1.0:
            raise ConfigError(f"method.feature_dropout={feature_dropout} must lie in [0, 1)")
        if len(loss_weights) != 3:
            raise ConfigError(
                f"method.loss_weights={list(loss_weights)} needs three values: the weights of L_s1, L_s2 and L_fp"
            )
        self.loss_weights = [float(w) for w in loss_weights]
        self.feature_dropout = feature_dropout
        super().__init__(**fixmatch)
        self.feature_perturbation = PerturbedFeatures(ChannelDropout(feature_dropout))

    def weak_and_perturbed(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits of the weak view ``(B, C, H, W)`` (clean features, detached) and of its features after
        ``Dropout2d`` (with gradient); the encoder runs once."""
        features = self.net.encode(image)
        with torch.no_grad():
            weak_logits = self.net.decode(features)
        perturbed_logits = self.net.decode(self.feature_perturbation(features))
        return weak_logits, perturbed_logits

    def unsupervised_loss(self, unlabeled: Batch, labeled: Batch) -> tuple[torch.Tensor, LossTerms]:
        weak_logits, perturbed_logits = self.weak_and_perturbed(unlabeled["image"])
        confidence, label = hard_pseudo_labels(weak_logits)
        loss_s1 = self.strong_loss(weak_logits, unlabeled["image_strong"], unlabeled["cutmix_box"])
        loss_s2 = self.strong_loss(weak_logits, unlabeled["image_strong2"], unlabeled["cutmix_box2"])
        loss_fp = confident_cross_entropy(perturbed_logits, label, confidence, self.threshold, self.ignore_index)
        w_s1, w_s2, w_fp = self.loss_weights
        unsupervised = w_s1 * loss_s1 + w_s2 * loss_s2 + w_fp * loss_fp
        weight = self.unsupervised_weight()
        return self.total_scale * weight * unsupervised, {
            "loss_s1": loss_s1,
            "loss_s2": loss_s2,
            "loss_fp": loss_fp,
            "weight_unsup": torch.tensor(weight),
            "confident_fraction": (confidence >= self.threshold).float().mean(),
        }
