"""Two networks of one architecture trained side by side (CPS, DCT, CPS with region growing).

:class:`TwoNetworkModule` builds ``self.net`` and ``self.net2`` from the ``model`` config (two constructions,
so two different initialisations) and picks what runs at inference: the first network (``inference: first``)
or the mean of both softmaxes (``inference: ensemble``, :class:`MeanSoftmaxEnsemble`).
"""

from __future__ import annotations

import torch
from torch import nn

from semiseg.methods.base import SemiSupervisedModule

TWO_NETWORK_INFERENCE = ("first", "ensemble")


class MeanSoftmaxEnsemble(nn.Module):
    """Mean of two networks' softmax, returned as log-probabilities (argmax-compatible logits)."""

    def __init__(self, first: nn.Module, second: nn.Module) -> None:
        super().__init__()
        self.first, self.second = first, second

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return ((self.first(image).softmax(1) + self.second(image).softmax(1)) / 2).clamp_min(1e-8).log()


class TwoNetworkModule(SemiSupervisedModule):
    """Base of methods that train two networks of the same architecture (CPS, DCT): ``self.net`` and
    ``self.net2``; inference runs the first (``inference: first``) or both (``inference: ensemble``)."""

    inference: str = "first"

    def configure_networks(self) -> None:
        # two independent constructions draw two different initialisations from the seeded generator
        self.net = self.build_network()
        self.net2 = self.build_network()

    @property
    def inference_network(self) -> nn.Module:
        return self.net if self.inference == "first" else MeanSoftmaxEnsemble(self.net, self.net2)
