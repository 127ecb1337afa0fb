"""The interface every segmentation network of the suite offers.

Methods with several heads on one encoder (UAPS, CCT, UCC, UniMatch's feature perturbation) need to run
the encoder once and feed its features to several decoders. Every network therefore exposes
``encode`` / ``decode`` and can build a fresh decoder of its own architecture with ``make_decoder``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

Features = list[torch.Tensor]


class SegmentationNetwork(nn.Module):
    """A network split into an encoder and a decoder.

    Subclasses set ``self.encoder`` and ``self.decoder`` (the decoder includes the classification head).
    ``decoder(features)`` maps the encoder's multi-level features to logits ``(B, num_classes, H, W)``.
    """

    encoder: nn.Module
    decoder: nn.Module
    in_channels: int
    num_classes: int
    size_divisor: int = 1  # input height and width must be multiples of this

    def encode(self, image: torch.Tensor) -> Features:
        """``image (B, C, H, W)`` -> list of feature maps, shallow to deep."""
        return self.encoder(image)

    def decode(self, features: Sequence[torch.Tensor], decoder: nn.Module | None = None) -> torch.Tensor:
        """Features -> logits ``(B, num_classes, H, W)``; ``decoder`` defaults to the main one."""
        return (decoder or self.decoder)(list(features))

    def make_decoder(self) -> nn.Module:
        """A freshly initialised decoder (with head) of the same architecture as ``self.decoder``."""
        raise NotImplementedError

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """``image (B, C, H, W)`` -> logits ``(B, num_classes, H, W)``."""
        return self.decode(self.encode(image))


def count_trainable_parameters(module: nn.Module) -> int:
    """Number of parameters with ``requires_grad`` (shared parameters counted once)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def is_channels_last(x: torch.Tensor) -> bool:
    """Is ``x`` a 4-d map laid out ``channels_last`` (and not also plain contiguous, as a 1x1 or 1-channel map is)?"""
    return x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
