"""Feature perturbations applied to encoder features before an auxiliary decoder (UAPS, CCT, UniMatch).

Each perturbation maps one feature map ``(B, C, H, W)`` to one of the same shape. They are active in
training mode and the identity in eval mode (auxiliary decoders do not run at inference anyway).
:func:`make_perturbation` gives the k-th auxiliary decoder's perturbation in the UAPS order
(noise, dropout, feature drop), cycling past three.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from semiseg.errors import ConfigError
from semiseg.models.base import is_channels_last


class FeatureNoise(nn.Module):
    """``x + x * u`` with ``u ~ U(-r, r)`` of shape ``(C, H, W)``: one draw per call, shared by the batch."""

    def __init__(self, uniform_range: float = 0.3) -> None:
        super().__init__()
        self.uniform_range = uniform_range

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x (B, C, H, W)`` -> ``x · (1 + u)``, the same as ``x + x · u`` up to rounding, in one product.

        The draw is laid out as ``x`` is (``(H, W, C)`` permuted to ``(C, H, W)`` for ``channels_last``), so the
        product runs over matching strides: on the CPU a ``(C, H, W)`` draw against a ``channels_last`` map made
        the two element-wise passes about 2.5 times slower (README, Performance).
        """
        if not self.training:
            return x
        if is_channels_last(x):
            channels, height, width = x.shape[1:]
            draw = torch.rand(height, width, channels, device=x.device, dtype=x.dtype).permute(2, 0, 1)
        else:
            draw = torch.rand(x.shape[1:], device=x.device, dtype=x.dtype)
        scale = draw.mul_(2 * self.uniform_range).add_(1 - self.uniform_range)  # 1 + U(-r, r), in place
        return x * scale.unsqueeze(0)


class FeatureDropout(nn.Dropout):
    """Element-wise dropout with probability ``p`` (kept values scaled by ``1 / (1 - p)``): ``nn.Dropout``, named
    for its place among the perturbations."""

    def __init__(self, p: float = 0.5) -> None:
        super().__init__(p)


class UniformMaskDropout(nn.Dropout):
    """``nn.Dropout`` whose mask, on the CPU, is drawn as ``u >= p`` with ``u ~ U[0, 1)`` per element.

    The same distribution as ``F.dropout`` (each element kept with probability exactly ``1 - p``, kept values
    scaled by ``1 / (1 - p)``, the identity in eval mode), from another random stream: on the CPU, ``F.dropout``'s
    ``bernoulli_`` made a forward + backward on 8 × 16 × 128² take about twice as long (45.7 vs 22.5 ms in a
    micro-benchmark; README, Performance). On other devices
    it is ``F.dropout``. :func:`semiseg.runner.apply_performance` swaps it in for every ``nn.Dropout`` when
    ``performance.cpu_dropout=uniform_mask`` (the default).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0 or self.p == 1 or x.device.type != "cpu":
            return F.dropout(x, self.p, self.training, self.inplace)
        scale = torch.rand_like(x).ge_(self.p).mul_(1.0 / (1.0 - self.p))  # 0 or 1/(1-p), in the draw's memory
        return x * scale


def use_uniform_mask_dropout(module: nn.Module) -> int:
    """Replace every ``nn.Dropout`` (element-wise, incl. :class:`FeatureDropout`) inside ``module`` with a
    :class:`UniformMaskDropout` of the same ``p``; returns how many were replaced (``Dropout2d`` is left as is)."""
    replaced = 0
    for parent in module.modules():
        for name, child in list(parent.named_children()):
            if type(child) in (nn.Dropout, FeatureDropout):
                fast = UniformMaskDropout(child.p, child.inplace)
                fast.train(child.training)
                setattr(parent, name, fast)
                replaced += 1
    return replaced


class FeatureDrop(nn.Module):
    """Attention-based feature drop: the channel mean is an attention map ``(B, 1, H, W)``; positions whose
    attention reaches ``max_attention * t``, ``t ~ U(low, high)`` drawn once per call, are zeroed."""

    def __init__(self, threshold_range: Sequence[float] = (0.7, 0.9)) -> None:
        super().__init__()
        self.low, self.high = (float(v) for v in threshold_range)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        attention = x.mean(dim=1, keepdim=True)
        max_attention = attention.flatten(1).max(dim=1).values.view(-1, 1, 1, 1)
        fraction = torch.empty((), device=x.device).uniform_(self.low, self.high)
        return x * (attention < max_attention * fraction).to(x.dtype)


class ChannelDropout(nn.Module):
    """``Dropout2d``: whole channels dropped with probability ``p`` (UniMatch's feature perturbation)."""

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout2d(x, self.p, training=self.training)


PERTURBATIONS = {
    "noise": FeatureNoise,
    "dropout": FeatureDropout,
    "feature_drop": FeatureDrop,
    "channel_dropout": ChannelDropout,
}
UAPS_ORDER = ("noise", "dropout", "feature_drop")


def make_perturbation(name: str, **options: float) -> nn.Module:
    """A perturbation by name: ``noise``, ``dropout``, ``feature_drop``, ``channel_dropout`` or ``none``."""
    if name == "none":
        return nn.Identity()
    if name not in PERTURBATIONS:
        raise ConfigError(f"unknown perturbation {name!r}; choose one of {[*PERTURBATIONS, 'none']}")
    return PERTURBATIONS[name](**options)


def uaps_perturbation(aux_index: int) -> nn.Module:
    """The perturbation of auxiliary decoder ``aux_index`` (0-based): noise, dropout, feature drop, cycling."""
    return make_perturbation(UAPS_ORDER[aux_index % len(UAPS_ORDER)])


class PerturbedFeatures(nn.Module):
    """Apply one perturbation to every level of a feature list."""

    def __init__(self, perturbation: nn.Module) -> None:
        super().__init__()
        self.perturbation = perturbation

    def forward(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [self.perturbation(level) for level in features]
