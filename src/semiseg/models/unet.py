"""The U-Net of UAPS and SSL4MIS, with encoder and decoder as separate modules.

Blocks are conv3x3-BN-LeakyReLU-dropout-conv3x3-BN-LeakyReLU; max-pool down, a conv3x3 head. Encoder
channels ``[16, 32, 64, 128, 256]`` and per-level encoder dropout ``[0.05, 0.1, 0.2, 0.3, 0.5]``; the
decoder has no dropout.

Upsampling. SSL4MIS's ``UpBlock`` offers a transposed convolution or a 1x1 convolution followed by
interpolation, and its default (``mode_upsampling=1``) is the 1x1 convolution + bilinear x2. Only that
default gives the parameter count the UAPS paper reports: for 3 input channels and 4 classes the whole
network has 1,814,052 parameters (1.82 M), one decoder 633,300. ``upsampling: bilinear`` is therefore the
default; ``upsampling: transposed`` (kernel 2, stride 2; 1,944,612 parameters) is the option.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from semiseg.errors import ConfigError, check_choice
from semiseg.models.base import Features, SegmentationNetwork, is_channels_last


class ConvBlock(nn.Sequential):
    """conv3x3-BN-LeakyReLU-dropout-conv3x3-BN-LeakyReLU; keeps the spatial size."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1),
            nn.BatchNorm2d(out_channels),
            nn.LeakyReLU(),
            nn.Dropout(dropout),
            nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1),
            nn.BatchNorm2d(out_channels),
            nn.LeakyReLU(),
        )


class UNetEncoder(nn.Module):
    """``image (B, C, H, W)`` -> ``len(channels)`` feature maps; level i has ``channels[i]`` channels at H/2^i."""

    def __init__(self, in_channels: int, channels: Sequence[int], dropout: Sequence[float]) -> None:
        super().__init__()
        if len(channels) != len(dropout):
            raise ConfigError(
                f"model.channels has {len(channels)} levels but model.encoder_dropout has {len(dropout)}: "
                "give one dropout rate per level"
            )
        self.levels = nn.ModuleList([ConvBlock(in_channels, channels[0], dropout[0])])
        for level in range(1, len(channels)):
            self.levels.append(
                nn.Sequential(nn.MaxPool2d(2), ConvBlock(channels[level - 1], channels[level], dropout[level]))
            )

    def forward(self, image: torch.Tensor) -> Features:
        features = []
        x = image
        for level in self.levels:
            x = level(x)
            features.append(x)
        return features


UPSAMPLING_MODES = ("bilinear", "transposed")


class UpBlock(nn.Module):
    """x2 upsampling of the deeper map to the skip's channels, concatenation with the skip, a ConvBlock."""

    def __init__(
        self, deep_channels: int, skip_channels: int, out_channels: int, dropout: float, upsampling: str
    ) -> None:
        super().__init__()
        check_choice("model.upsampling", upsampling, UPSAMPLING_MODES)
        if upsampling == "bilinear":
            self.up = nn.Sequential(
                nn.Conv2d(deep_channels, skip_channels, kernel_size=1),
                nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True),
            )
        else:  # transposed
            self.up = nn.ConvTranspose2d(deep_channels, skip_channels, kernel_size=2, stride=2)
        self.conv = ConvBlock(2 * skip_channels, out_channels, dropout)

    def forward(self, deep: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([skip, dense_gradient(self.up(deep))], dim=1))


class _DenseChannelsLastGradient(torch.autograd.Function):
    """The identity; its backward hands on the gradient as a dense ``channels_last`` tensor."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous(memory_format=torch.channels_last)


def dense_gradient(x: torch.Tensor) -> torch.Tensor:
    """``x`` unchanged; for a ``channels_last`` CPU map that needs a gradient, the gradient reaching it is made dense.

    The gradient of one input of a channel concatenation is a channel slice of the concatenation's gradient. In
    ``channels_last`` that slice is strided, and the CPU backward of the bilinear upsampling then copies it to
    a contiguous NCHW tensor and runs its NCHW kernel: about 4 times the time of a ``channels_last`` copy followed
    by the ``channels_last`` kernel (20 vs 5 ms per decoder at 128², batch 8; README, Performance). Same values.
    """
    if x.requires_grad and x.device.type == "cpu" and is_channels_last(x):  # measured on the CPU only
        return _DenseChannelsLastGradient.apply(x)
    return x


class UNetDecoder(nn.Module):
    """Features from :class:`UNetEncoder` -> logits ``(B, num_classes, H, W)``."""

    def __init__(self, channels: Sequence[int], num_classes: int, upsampling: str = "bilinear") -> None:
        super().__init__()
        ups = []
        for level in range(len(channels) - 1, 0, -1):
            ups.append(UpBlock(channels[level], channels[level - 1], channels[level - 1], 0.0, upsampling))
        self.ups = nn.ModuleList(ups)
        self.head = nn.Conv2d(channels[0], num_classes, kernel_size=3, padding=1)

    def forward(self, features: Features) -> torch.Tensor:
        x = features[-1]
        for up, skip in zip(self.ups, reversed(features[:-1]), strict=True):
            x = up(x, skip)
        return self.head(x)


class UNet(SegmentationNetwork):
    """The UAPS / SSL4MIS U-Net.

    Args:
        in_channels: image channels (from the dataset config).
        num_classes: output classes including background (from the dataset config).
        channels: encoder channels per level, shallow to deep.
        encoder_dropout: dropout rate inside each encoder level's block.
        upsampling: ``bilinear`` (1x1 conv + bilinear x2, the SSL4MIS/UAPS default) or ``transposed``.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        channels: Sequence[int] = (16, 32, 64, 128, 256),
        encoder_dropout: Sequence[float] = (0.05, 0.1, 0.2, 0.3, 0.5),
        upsampling: str = "bilinear",
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.channels = list(channels)
        self.upsampling = upsampling
        self.size_divisor = 2 ** (len(self.channels) - 1)
        self.encoder = UNetEncoder(in_channels, self.channels, list(encoder_dropout))
        self.decoder = self.make_decoder()

    def make_decoder(self) -> nn.Module:
        return UNetDecoder(self.channels, self.num_classes, self.upsampling)
