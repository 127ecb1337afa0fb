"""CutMix on batches: boxes, and mixing of images, labels and probability maps with the same boxes.

Boxes come either from the DataModule (views ``cutmix_box``/``cutmix_box2``, drawn per sample in the
loader) or from :func:`random_boxes` here (drawn on the batch's device from torch's seeded generator).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def random_boxes(
    batch_size: int,
    height: int,
    width: int,
    prob: float = 0.5,
    area: Sequence[float] = (0.02, 0.4),
    aspect: Sequence[float] = (0.3, 1 / 0.3),
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """``(B, H, W)`` bool masks, each holding one box with probability ``prob`` (else empty).

    A box covers a share of the image drawn from ``area`` (a fixed share when ``area[0] == area[1]``,
    e.g. U2PL's half image) with aspect ratio from ``aspect``; it lies inside the image.
    """
    boxes = torch.zeros(batch_size, height, width, dtype=torch.bool, device=device)
    draws = torch.rand(batch_size, 5)
    for index in range(batch_size):
        apply, area_draw, aspect_draw, x_draw, y_draw = draws[index].tolist()
        if apply >= prob:
            continue
        size = (area[0] + (area[1] - area[0]) * area_draw) * height * width
        ratio = aspect[0] + (aspect[1] - aspect[0]) * aspect_draw
        box_h = max(1, min(height, round((size * ratio) ** 0.5)))
        box_w = max(1, min(width, round((size / ratio) ** 0.5)))
        top = int(y_draw * (height - box_h + 1))
        left = int(x_draw * (width - box_w + 1))
        boxes[index, top : top + box_h, left : left + box_w] = True
    return boxes


def mix(base: torch.Tensor, other: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Take ``other`` inside ``boxes`` and ``base`` elsewhere.

    ``base``/``other``: ``(B, H, W)`` labels or ``(B, C, H, W)`` images / probabilities; ``boxes``: ``(B, H, W)``.
    """
    mask = boxes.bool()
    if base.ndim == mask.ndim + 1:
        mask = mask.unsqueeze(1)
    return torch.where(mask, other, base)


def rolled(tensor: torch.Tensor, shift: int = 1) -> torch.Tensor:
    """The batch rolled by ``shift``: the usual partner of each sample for in-batch mixing."""
    return tensor.roll(shift, dims=0)
