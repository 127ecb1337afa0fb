"""One shared encoder, a main decoder and auxiliary decoders fed perturbed features (UAPS, CCT, UCC).

The encoder runs once per input; every auxiliary decoder sees the encoder's features through its own
perturbation (every feature level is perturbed). At inference only the main decoder runs, unless
``ensemble`` asks for the mean of all decoders' softmax.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from semiseg.models.base import SegmentationNetwork
from semiseg.models.perturbations import PerturbedFeatures


class MultiDecoderNetwork(nn.Module):
    """A :class:`SegmentationNetwork` with ``len(perturbations)`` auxiliary decoders.

    Args:
        network: the base network; its encoder and main decoder are used as they are.
        perturbations: one perturbation module per auxiliary decoder.
    """

    def __init__(self, network: SegmentationNetwork, perturbations: Sequence[nn.Module]) -> None:
        super().__init__()
        self.network = network
        self.aux_decoders = nn.ModuleList([network.make_decoder() for _ in perturbations])
        self.perturbations = nn.ModuleList([PerturbedFeatures(p) for p in perturbations])
        self.size_divisor = getattr(network, "size_divisor", 1)

    @property
    def num_decoders(self) -> int:
        """Main plus auxiliary decoders."""
        return 1 + len(self.aux_decoders)

    def forward_all(self, image: torch.Tensor) -> list[torch.Tensor]:
        """Logits of every decoder, main first: ``num_decoders`` tensors ``(B, num_classes, H, W)``.

        The encoder runs once; the main decoder sees clean features.
        """
        features = self.network.encode(image)
        outputs = [self.network.decode(features)]
        for decoder, perturb in zip(self.aux_decoders, self.perturbations, strict=True):
            outputs.append(self.network.decode(perturb(features), decoder))
        return outputs

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Logits of the main decoder only ``(B, num_classes, H, W)``."""
        return self.network(image)

    def ensemble_probabilities(self, image: torch.Tensor) -> torch.Tensor:
        """Mean softmax of all decoders ``(B, num_classes, H, W)`` (perturbations as in the current mode)."""
        return torch.stack([logits.softmax(dim=1) for logits in self.forward_all(image)]).mean(dim=0)
