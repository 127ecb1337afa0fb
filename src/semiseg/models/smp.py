"""segmentation-models-pytorch networks behind the suite's encoder/decoder interface."""

from __future__ import annotations

from typing import Any

import segmentation_models_pytorch as smp
import torch
from torch import nn

from semiseg.errors import ConfigError
from semiseg.models.base import Features, SegmentationNetwork


class DecoderWithHead(nn.Module):
    """An smp decoder followed by its segmentation head: features -> logits ``(B, num_classes, H, W)``."""

    def __init__(self, decoder: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.decoder = decoder
        self.head = head

    def features(self, features: Features) -> torch.Tensor:
        """The decoder's output before the head ``(B, D, H', W')`` (for representation heads)."""
        return self.decoder(features)

    def forward(self, features: Features) -> torch.Tensor:
        return self.head(self.decoder(features))


class SmpNetwork(SegmentationNetwork):
    """Any smp architecture (``Unet``, ``DeepLabV3Plus``, ``FPN``, ...) with any of its encoders.

    Args:
        in_channels, num_classes: from the dataset config.
        arch: smp architecture name.
        encoder_name: smp/timm encoder name (``resnet18``, ``efficientnet-b0``, ...).
        encoder_weights: pretrained weights to download (``imagenet``) or ``None`` (default: no download).
        **kwargs: further arguments of the smp architecture.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        arch: str = "Unet",
        encoder_name: str = "resnet18",
        encoder_weights: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.arch = arch
        self.encoder_name = encoder_name
        self.kwargs = kwargs
        model = self._create(encoder_weights)
        self.encoder = model.encoder
        self.decoder = DecoderWithHead(model.decoder, model.segmentation_head)
        self.size_divisor = int(getattr(model.encoder, "output_stride", 32))

    def _create(self, encoder_weights: str | None) -> nn.Module:
        try:
            return smp.create_model(
                self.arch,
                encoder_name=self.encoder_name,
                encoder_weights=encoder_weights,
                in_channels=self.in_channels,
                classes=self.num_classes,
                **self.kwargs,
            )
        except (KeyError, ValueError, TypeError) as error:
            raise ConfigError(
                f"model: smp cannot build arch={self.arch!r} with encoder_name={self.encoder_name!r} ({error}); "
                "see https://smp.readthedocs.io for architectures and encoders"
            ) from None
        except Exception as error:  # network errors while fetching weights come in many types
            if encoder_weights is None:
                raise
            raise ConfigError(
                f"model.encoder_weights={encoder_weights!r} for {self.encoder_name} could not be fetched "
                f"({type(error).__name__}: {error}); use model.encoder_weights=null, or download the weights "
                "once on a machine with internet access into the torch/huggingface cache"
            ) from None

    def make_decoder(self) -> nn.Module:
        model = self._create(None)
        return DecoderWithHead(model.decoder, model.segmentation_head)

    def encode(self, image: torch.Tensor) -> Features:
        return list(self.encoder(image))
