"""Sliding-window inference: whole images at their own resolution through overlapping tiles.

A network trained on ``data.crop_size`` patches sees, at validation, test and prediction, the whole image at
the same resolution: the image is cut into tiles of ``window_size`` that overlap by ``window_overlap`` (a share
of the tile's side), each tile's softmax is weighted by a per-pixel importance map (``gaussian``: centre pixels
count more, standard deviation ``window_sigma`` times the tile's side, the nnU-Net/MONAI choice; ``mean``: all
pixels alike) and the weighted probabilities are averaged where tiles overlap. Tiles always have the full window
size: the last tile of a row or column is moved back to end at the image's border, and an image smaller than a
tile is padded at its bottom and right with zeros (the normalised mean colour), the padding then cut off again.

The result is returned as log-probabilities ``log p̄`` of shape ``(B, num_classes, H, W)``: their argmax is the
prediction and ``softmax(log p̄) = p̄``, so every consumer of logits (metrics, the loss, overlays) takes them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from semiseg.errors import ConfigError

WEIGHTINGS = ("gaussian", "mean")
PROBABILITY_FLOOR = 1e-8  # floor of averaged probabilities before the log
WEIGHT_FLOOR = 1e-6  # smallest weight of a tile pixel


def tile_starts(length: int, tile: int, stride: int) -> list[int]:
    """Start offsets of tiles of size ``tile`` covering ``[0, length)`` with step ``stride``; the last tile ends
    at ``length`` (``length >= tile``)."""
    count = max(1, math.ceil((length - tile) / stride) + 1)
    starts = [min(index * stride, length - tile) for index in range(count)]
    return sorted(set(starts))


def importance_map(height: int, width: int, weighting: str, sigma: float) -> torch.Tensor:
    """Per-pixel weight of a tile ``(height, width)``, maximum 1: a Gaussian centred on the tile with standard
    deviation ``sigma * side`` per axis (``gaussian``), or ones (``mean``)."""
    if weighting == "mean":
        return torch.ones(height, width)

    def axis(size: int) -> torch.Tensor:
        centre = (size - 1) / 2
        position = torch.arange(size, dtype=torch.float64)
        return torch.exp(-0.5 * ((position - centre) / (sigma * size)) ** 2)

    weights = axis(height)[:, None] * axis(width)[None, :]
    # a pixel covered by one tile's corner only must keep a usable weight (a narrow sigma underflows there)
    return (weights / weights.max()).clamp_min(WEIGHT_FLOOR).float()


@dataclass(frozen=True)
class SlidingWindow:
    """Overlapping-tile inference of whole images.

    Args:
        window_size: ``(height, width)`` of a tile (the training crop).
        overlap: share of a tile's side shared with the next tile, in ``[0, 1)``.
        weighting: ``gaussian`` or ``mean``.
        sigma: ``gaussian``: standard deviation as a share of the tile's side.
        batch_size: tiles per forward pass.
    """

    window_size: tuple[int, int]
    overlap: float = 0.5
    weighting: str = "gaussian"
    sigma: float = 0.125
    batch_size: int = 16

    @classmethod
    def from_config(cls, evaluation: Mapping[str, Any] | None, size_divisor: int = 1) -> SlidingWindow | None:
        """The window of an ``evaluation`` config, or ``None`` when ``sliding_window`` is off. Refuses bad
        values with one line naming the key (``size_divisor``: the network's input multiple)."""
        evaluation = dict(evaluation or {})
        if not evaluation.get("sliding_window", False):
            return None
        size = evaluation.get("window_size")
        if size is None or len(size) != 2 or min(int(side) for side in size) < 1:
            raise ConfigError(
                f"evaluation.window_size={size!r}: the sliding window needs [height, width]; set data.crop_size "
                "(the window follows it) or evaluation.window_size=[128,128]"
            )
        height, width = (int(side) for side in size)
        if height % size_divisor or width % size_divisor:
            raise ConfigError(
                f"evaluation.window_size=[{height},{width}] (data.crop_size) must be a multiple of {size_divisor} "
                f"for this model, e.g. [{max(size_divisor, height // size_divisor * size_divisor)},"
                f"{max(size_divisor, width // size_divisor * size_divisor)}]"
            )
        overlap = float(evaluation.get("window_overlap", 0.5))
        if not 0 <= overlap < 1:
            raise ConfigError(f"evaluation.window_overlap={overlap} must lie in [0, 1), e.g. 0.5")
        weighting = str(evaluation.get("window_weighting", "gaussian"))
        if weighting not in WEIGHTINGS:
            raise ConfigError(f"evaluation.window_weighting={weighting!r} must be one of {list(WEIGHTINGS)}")
        sigma = float(evaluation.get("window_sigma", 0.125))
        if not sigma > 0:
            raise ConfigError(f"evaluation.window_sigma={sigma} must be positive, e.g. 0.125")
        batch_size = evaluation.get("window_batch_size", 16)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"evaluation.window_batch_size={batch_size!r} must be a positive integer, e.g. 16")
        return cls((height, width), overlap, weighting, sigma, batch_size)

    def settings(self) -> dict[str, Any]:
        """The window as plain data (for ``model.json``)."""
        return {
            "window_size": list(self.window_size),
            "window_overlap": self.overlap,
            "window_weighting": self.weighting,
            "window_sigma": self.sigma,
            "window_batch_size": self.batch_size,
        }

    def positions(self, height: int, width: int) -> list[tuple[int, int]]:
        """Top-left corners ``(y, x)`` of the tiles of a (padded) ``height x width`` image."""
        tile_h, tile_w = self.window_size
        stride_h = max(1, round(tile_h * (1 - self.overlap)))
        stride_w = max(1, round(tile_w * (1 - self.overlap)))
        return [(y, x) for y in tile_starts(height, tile_h, stride_h) for x in tile_starts(width, tile_w, stride_w)]

    def __call__(self, predict_logits: Callable[[torch.Tensor], torch.Tensor], image: torch.Tensor) -> torch.Tensor:
        """``image (B, C, H, W)`` -> log of the averaged tile probabilities ``(B, num_classes, H, W)``.

        ``predict_logits`` maps tiles ``(N, C, h, w)`` to logits ``(N, num_classes, h, w)``.
        """
        batch, _, height, width = image.shape
        tile_h, tile_w = self.window_size
        padded = F.pad(image, (0, max(0, tile_w - width), 0, max(0, tile_h - height)))
        full_h, full_w = padded.shape[-2:]
        positions = self.positions(full_h, full_w)
        weights = importance_map(tile_h, tile_w, self.weighting, self.sigma).to(image.device)
        total: torch.Tensor | None = None
        weight_sum = torch.zeros(full_h, full_w, device=image.device)
        for start in range(0, len(positions), max(1, self.batch_size // batch)):
            chunk = positions[start : start + max(1, self.batch_size // batch)]
            tiles = torch.cat([padded[:, :, y : y + tile_h, x : x + tile_w] for y, x in chunk])
            probabilities = predict_logits(tiles).float().softmax(dim=1)  # (len(chunk) * B, K, h, w)
            if total is None:
                total = probabilities.new_zeros(batch, probabilities.shape[1], full_h, full_w)
            for index, (y, x) in enumerate(chunk):
                tile = probabilities[index * batch : (index + 1) * batch]
                total[:, :, y : y + tile_h, x : x + tile_w] += tile * weights
                weight_sum[y : y + tile_h, x : x + tile_w] += weights
        assert total is not None  # at least one tile
        averaged = total / weight_sum
        return averaged[:, :, :height, :width].clamp_min(PROBABILITY_FLOOR).log()
