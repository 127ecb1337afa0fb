"""Cross pseudo supervision (Chen, Yuan, Zeng, Wang, "Semi-Supervised Semantic Segmentation with Cross
Pseudo Supervision", CVPR 2021).

Two networks of the same architecture with different initialisations. Each is supervised on the labeled
images and, on the unlabeled ones, trained with cross-entropy on the *other* network's hard pseudo-labels
(argmax, detached): ``L_cps = CE(p1, argmax p2) + CE(p2, argmax p1)``, weighted by
``weight · rampup(t)``. The paper also applies the CPS loss to the labeled images
(``cps_on_labeled: true``, its default); the UAPS comparison code applies it to unlabeled images only.
At inference the first network runs (``inference: first``) or the mean of both softmaxes (``ensemble``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from semiseg.errors import ConfigError
from semiseg.losses import cross_entropy
from semiseg.methods.base import Batch, LossTerms, SemiSupervisedModule


class _Ensemble(nn.Module):
    """Mean of the two networks' softmax, returned as log-probabilities (argmax-compatible logits)."""

    def __init__(self, first: nn.Module, second: nn.Module) -> None:
        super().__init__()
        self.first, self.second = first, second

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return ((self.first(image).softmax(1) + self.second(image).softmax(1)) / 2).clamp_min(1e-8).log()


class CPS(SemiSupervisedModule):
    """Cross pseudo supervision.

    Args:
        weight: λ, the CPS loss weight at the end of the ramp-up.
        rampup_steps: sigmoid ramp-up length of λ, in optimisation steps (0: no ramp).
        cps_on_labeled: also apply the CPS loss to the labeled images (the paper's default).
        inference: ``first`` (network 1) or ``ensemble`` (mean softmax of both).
    """

    def __init__(
        self,
        weight: float = 1.5,
        rampup_steps: float = 0,
        cps_on_labeled: bool = True,
        inference: str = "first",
        **base: Any,
    ) -> None:
        if inference not in ("first", "ensemble"):
            raise ConfigError(f"method.inference={inference!r} must be 'first' or 'ensemble'")
        self.weight = weight
        self.rampup_steps = rampup_steps
        self.cps_on_labeled = cps_on_labeled
        self.inference = inference
        super().__init__(**base)

    def configure_networks(self) -> None:
        # two independent constructions draw two different initialisations from the seeded generator
        self.net = self.build_network()
        self.net2 = self.build_network()

    @property
    def inference_network(self) -> nn.Module:
        return self.net if self.inference == "first" else _Ensemble(self.net, self.net2)

    def supervised_loss(self, labeled: Batch) -> tuple[torch.Tensor, LossTerms]:
        self._labeled_logits = (self.net(labeled["image"]), self.net2(labeled["image"]))
        first = self.seg_loss(self._labeled_logits[0], labeled["mask"])
        second = self.seg_loss(self._labeled_logits[1], labeled["mask"])
        return first + second, {"loss_sup_net1": first, "loss_sup_net2": second}

    def cross_pseudo_loss(self, logits1: torch.Tensor, logits2: torch.Tensor) -> torch.Tensor:
        """``CE(logits1, argmax logits2) + CE(logits2, argmax logits1)`` with detached pseudo-labels."""
        pseudo1, pseudo2 = logits1.detach().argmax(1), logits2.detach().argmax(1)
        return cross_entropy(logits1, pseudo2, self.ignore_index) + cross_entropy(logits2, pseudo1, self.ignore_index)

    def unsupervised_loss(self, unlabeled: Batch, labeled: Batch) -> tuple[torch.Tensor, LossTerms]:
        image = unlabeled["image"]
        loss_cps = self.cross_pseudo_loss(self.net(image), self.net2(image))
        if self.cps_on_labeled:
            loss_cps = loss_cps + self.cross_pseudo_loss(*self._labeled_logits)
        weight = self.weight * self.rampup(self.rampup_steps)
        return weight * loss_cps, {"loss_cps": loss_cps, "weight_cps": torch.tensor(weight)}
