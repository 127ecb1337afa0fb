"""The small U-Net of the Inconsistency Masks paper (Vorndran et al., arXiv 2401.14387), with additive skips.

Widths are ``int(w · α)`` for base widths 16, 32, 64, 128, 256 and the width multiplier α
(``width_multiplier``), as in the official code:

* input block: conv1x1 (16α) - act - BN;
* four encoder levels: conv kxk (f) - act - conv1x1 (f) - act - dropout - BN, then max-pool,
  with f = 16α, 32α, 64α, 128α;
* bottleneck: conv kxk (256α) - act - conv1x1 (128α) - act - dropout - BN;
* four decoder levels: nearest x2 upsampling, **added** to the skip (not concatenated), conv1x1 (f1) - act -
  BN - conv kxk (f1) - act - conv1x1 (f2) - act - dropout - BN with (f1, f2) = (128α, 64α), (64α, 32α),
  (32α, 16α), (16α, 16α);
* head: conv1x1 to the classes (the official code ends in a sigmoid/softmax; here the loss applies it).

The official code divides raw pixels by 255 inside the network; here the DataModule normalises the input.
Convolutions use He-normal initialisation like the official Keras code (``init: default`` keeps PyTorch's).
"""

from __future__ import annotations

import torch
from torch import nn

from semiseg.errors import ConfigError, check_choice
from semiseg.models.base import Features, SegmentationNetwork

BASE_WIDTHS = (16, 32, 64, 128, 256)
INITS = ("he_normal", "default")  # weight initialisation: the official code's He normal, or PyTorch's
ACTIVATIONS = {"relu": nn.ReLU, "elu": nn.ELU, "leaky_relu": nn.LeakyReLU, "gelu": nn.GELU, "silu": nn.SiLU}


def _width(base: int, alpha: float) -> int:
    return max(1, int(base * alpha))


class _Block(nn.Sequential):
    """conv kxk (mid) - act - conv1x1 (out) - act - dropout - BN."""

    def __init__(self, in_ch: int, mid: int, out: int, kernel: int, act: type[nn.Module], dropout: float) -> None:
        layers: list[nn.Module] = [
            nn.Conv2d(in_ch, mid, kernel, padding=kernel // 2),
            act(),
            nn.Conv2d(mid, out, 1),
            act(),
        ]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        layers.append(nn.BatchNorm2d(out))
        super().__init__(*layers)


class IMUNetEncoder(nn.Module):
    """``image (B, C, H, W)`` -> five feature maps: four encoder levels (16α..128α channels at H/2^i) and the
    bottleneck (128α channels at H/16)."""

    def __init__(
        self, in_channels: int, alpha: float, kernel: int, act: type[nn.Module], dropout: float, bottleneck: float
    ) -> None:
        super().__init__()
        w = [_width(b, alpha) for b in BASE_WIDTHS]
        self.input_block = nn.Sequential(nn.Conv2d(in_channels, w[0], 1), act(), nn.BatchNorm2d(w[0]))
        self.levels = nn.ModuleList(
            [_Block(w[0] if i == 0 else w[i - 1], w[i], w[i], kernel, act, dropout) for i in range(4)]
        )
        self.pool = nn.MaxPool2d(2)
        self.bottleneck = _Block(w[3], w[4], w[3], kernel, act, bottleneck)

    def forward(self, image: torch.Tensor) -> Features:
        features = []
        x = self.input_block(image)
        for index, level in enumerate(self.levels):
            x = level(x if index == 0 else self.pool(x))
            features.append(x)
        features.append(self.bottleneck(self.pool(x)))
        return features


class _UpBlock(nn.Module):
    def __init__(self, channels: int, mid: int, out: int, kernel: int, act: type[nn.Module], dropout: float) -> None:
        super().__init__()
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.squeeze = nn.Sequential(nn.Conv2d(channels, mid, 1), act(), nn.BatchNorm2d(mid))
        self.block = _Block(mid, mid, out, kernel, act, dropout)

    def forward(self, deep: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.block(self.squeeze(self.up(deep) + skip))


class IMUNetDecoder(nn.Module):
    """Features of :class:`IMUNetEncoder` -> logits ``(B, num_classes, H, W)``."""

    def __init__(self, num_classes: int, alpha: float, kernel: int, act: type[nn.Module], dropout: float) -> None:
        super().__init__()
        w = [_width(b, alpha) for b in BASE_WIDTHS]
        # (channels in = skip channels, f1, f2) per level, deep to shallow
        plan = [(w[3], w[3], w[2]), (w[2], w[2], w[1]), (w[1], w[1], w[0]), (w[0], w[0], w[0])]
        self.ups = nn.ModuleList([_UpBlock(c, f1, f2, kernel, act, dropout) for c, f1, f2 in plan])
        self.head = nn.Conv2d(w[0], num_classes, 1)

    def forward(self, features: Features) -> torch.Tensor:
        x = features[-1]
        for up, skip in zip(self.ups, reversed(features[:-1]), strict=True):
            x = up(x, skip)
        return self.head(x)


class IMUNet(SegmentationNetwork):
    """The Inconsistency Masks paper's U-Net.

    Args:
        in_channels, num_classes: from the dataset.
        width_multiplier: α, scales every width (``int(w · α)``).
        kernel_size: the kxk convolutions' size (3).
        activation: one of ``relu``, ``elu``, ``leaky_relu``, ``gelu``, ``silu``.
        dropout_encoder, dropout_bottleneck, dropout_decoder: dropout rates (0 in the official code).
        init: ``he_normal`` (the official code) or ``default`` (PyTorch's).
    """

    size_divisor = 16

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        width_multiplier: float = 1.0,
        kernel_size: int = 3,
        activation: str = "relu",
        dropout_encoder: float = 0.0,
        dropout_bottleneck: float = 0.0,
        dropout_decoder: float = 0.0,
        init: str = "he_normal",
    ) -> None:
        super().__init__()
        if width_multiplier <= 0:
            raise ConfigError(f"model.width_multiplier={width_multiplier} must be > 0")
        check_choice("model.activation", activation, sorted(ACTIVATIONS))
        check_choice("model.init", init, INITS)
        for key, rate in (("dropout_encoder", dropout_encoder), ("dropout_bottleneck", dropout_bottleneck),
                          ("dropout_decoder", dropout_decoder)):  # fmt: skip
            if not 0.0 <= rate < 1.0:
                raise ConfigError(f"model.{key}={rate} must lie in [0, 1)")
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.alpha = float(width_multiplier)
        self.kernel_size = kernel_size
        self.activation = ACTIVATIONS[activation]
        self.dropout_decoder = dropout_decoder
        self.init = init
        self.encoder = IMUNetEncoder(
            in_channels, self.alpha, kernel_size, self.activation, dropout_encoder, dropout_bottleneck
        )
        self.decoder = self.make_decoder()
        if init == "he_normal":
            self.apply(_he_normal)

    def make_decoder(self) -> nn.Module:
        decoder = IMUNetDecoder(self.num_classes, self.alpha, self.kernel_size, self.activation, self.dropout_decoder)
        if self.init == "he_normal":
            decoder.apply(_he_normal)
        return decoder


def _he_normal(module: nn.Module) -> None:
    if isinstance(module, nn.Conv2d):
        nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
        if module.bias is not None:
            nn.init.zeros_(module.bias)
