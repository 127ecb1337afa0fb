"""Seeded region growing of partial labels (after Huang et al., "Weakly-Supervised Semantic Segmentation
Network with Deep Seeded Region Growing", CVPR 2018, as adapted to partial labels by the
plaggy/Semi_supervised_seismic_segmentation code).

Given class probabilities and partial labels, repeat until no pixel changes: an unlabeled pixel whose
argmax class is ``c`` takes the label ``c`` when its probability of ``c`` exceeds ``threshold[c]`` and it lies
inside the ``neighbourhood[c] x neighbourhood[c]`` box around some pixel already labeled ``c``. Labeled
pixels are never changed. Each round is one max-pooling per class, so a whole batch grows at once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from semiseg.errors import ConfigError


def per_class_values(value: Any, class_names: Sequence[str], key: str, kind: type = float) -> list:
    """A per-class setting -> one value per class.

    ``value`` is a number (every class), a list (one per class, in class order) or a mapping from class
    names to values with an optional ``default`` for the classes it does not name.
    """
    num_classes = len(class_names)
    if isinstance(value, Mapping):
        unknown = sorted(set(value) - set(class_names) - {"default"})
        if unknown:
            raise ConfigError(f"{key} names unknown classes {unknown}; the dataset's classes are {list(class_names)}")
        missing = [name for name in class_names if name not in value]
        if missing and "default" not in value:
            raise ConfigError(f"{key} gives no value for classes {missing}; add them or a 'default'")
        return [kind(value.get(name, value.get("default"))) for name in class_names]
    if isinstance(value, Sequence) and not isinstance(value, str):
        if len(value) != num_classes:
            raise ConfigError(f"{key} has {len(value)} values for {num_classes} classes {list(class_names)}")
        return [kind(v) for v in value]
    return [kind(value)] * num_classes


def box_neighbourhood(labels: torch.Tensor, size: int) -> torch.Tensor:
    """``labels (B, H, W)`` bool -> bool ``(B, H, W)``: pixels whose ``size x size`` box holds a labeled pixel.

    A labeled pixel at ``x`` reaches ``x - (size - 1) // 2 .. x + size // 2`` along each axis: for an even
    ``size`` one pixel further right/down than left/up.
    """
    if size <= 1:
        return labels.clone()
    back, ahead = (size - 1) // 2, size // 2
    # F.pad's order is (left, right, top, bottom); padding `ahead` on the left lets a label reach `ahead` rightwards
    padded = F.pad(labels.unsqueeze(1).float(), (ahead, back, ahead, back))
    return F.max_pool2d(padded, kernel_size=size, stride=1).squeeze(1) > 0


@torch.no_grad()
def grow_regions(
    probs: torch.Tensor,
    labels: torch.Tensor,
    neighbourhood: Sequence[int],
    threshold: Sequence[float],
    ignore_index: int = 255,
    max_rounds: int = 1000,
    grow_classes: Sequence[bool] | None = None,
) -> tuple[torch.Tensor, int]:
    """Grow partial ``labels (B, H, W)`` with class probabilities ``probs (B, C, H, W)``.

    Args:
        probs: per-pixel class probabilities (e.g. the mean softmax of two networks).
        labels: current labels; ``ignore_index`` marks unlabeled pixels.
        neighbourhood: box size per class (pixels).
        threshold: minimum probability per class.
        ignore_index: the unlabeled value.
        max_rounds: safety cap on the rounds (growth stops earlier when nothing changes).
        grow_classes: per class, whether it may grow (default: all).

    Returns:
        the grown labels ``(B, H, W)`` (same dtype) and the number of rounds that changed something.
    """
    num_classes = probs.shape[1]
    if len(neighbourhood) != num_classes or len(threshold) != num_classes:
        raise ConfigError(
            f"region growing needs one neighbourhood and one threshold per class ({num_classes}); "
            f"got {len(neighbourhood)} and {len(threshold)}"
        )
    grow_classes = [True] * num_classes if grow_classes is None else list(grow_classes)
    confidence, prediction = probs.max(dim=1)
    # where each class may ever grow: predicted there with enough probability
    candidates = [
        (prediction == c) & (confidence > threshold[c]) if grow_classes[c] else None for c in range(num_classes)
    ]
    labels = labels.clone()
    rounds = 0
    while rounds < max_rounds:
        unlabeled = labels == ignore_index
        changed = False
        new_labels = labels.clone()
        for c in range(num_classes):
            if candidates[c] is None:
                continue
            reachable = candidates[c] & unlabeled
            if not reachable.any():
                continue
            near = box_neighbourhood(labels == c, int(neighbourhood[c]))
            take = reachable & near
            if take.any():
                new_labels[take] = c  # classes are disjoint: a pixel has one argmax
                changed = True
        if not changed:
            break
        labels = new_labels
        rounds += 1
    return labels, rounds
