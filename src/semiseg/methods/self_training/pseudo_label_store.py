"""A generation's pseudo-labels: stored once per generation, read by every student of that generation.

``pseudo_labels.npz`` in the generation's folder holds, for the ``N`` unlabeled images (at the dataset's
``image_size``): ``ids (N,)``, ``labels (N, H, W)`` uint8, ``masks (N, H, W)`` bool (the inconsistency mask:
``True`` = not a pseudo-label), ``copies (N,)`` int (how often the image enters the training set; 0 drops it,
e.g. after EvalNet filtering) and ``scores (N,)`` float (EvalNet's predicted IoU; NaN without EvalNet).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from semiseg.io import atomic_write_bytes
from semiseg.metrics import scores_from_confusion


@dataclass
class PseudoLabels:
    """Pseudo-labels of the unlabeled images (see the module docstring for the arrays' shapes)."""

    ids: list[str]
    labels: np.ndarray
    masks: np.ndarray
    copies: np.ndarray
    scores: np.ndarray

    def __post_init__(self) -> None:
        count = len(self.ids)
        for name in ("labels", "masks", "copies", "scores"):
            if len(getattr(self, name)) != count:
                raise ValueError(f"pseudo-labels: {name} has {len(getattr(self, name))} entries for {count} ids")

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def coverage(self) -> float:
        """Share of the pixels of the kept images that carry a pseudo-label (not masked)."""
        kept = self.copies > 0
        if not kept.any():
            return 0.0
        return float(1.0 - self.masks[kept].mean())

    def save(self, path: Path) -> None:
        import io

        buffer = io.BytesIO()
        np.savez_compressed(
            buffer,
            ids=np.asarray(self.ids),
            labels=self.labels,
            masks=self.masks,
            copies=self.copies,
            scores=self.scores,
        )
        atomic_write_bytes(path, buffer.getvalue())

    @classmethod
    def load(cls, path: Path) -> PseudoLabels:
        with np.load(path) as data:
            return cls(
                ids=[str(i) for i in data["ids"]],
                labels=data["labels"],
                masks=data["masks"],
                copies=data["copies"],
                scores=data["scores"],
            )


def pseudo_label_quality(
    labels: torch.Tensor,
    masks: torch.Tensor,
    ground_truth: torch.Tensor,
    num_classes: int,
    ignore_index: int,
    background_index: int = 0,
) -> dict[str, float]:
    """Diagnostic only: the pseudo-labels scored against the hidden ground truth of the unlabeled images.

    Args:
        labels: ``(N, H, W)`` pseudo-labels; masks: ``(N, H, W)`` bool, masked pixels are left out.
        ground_truth: ``(N, H, W)`` the true masks (never used in training).

    Returns:
        ``mIoU`` over the defect classes and ``pixel_acc``, both on the unmasked pixels.
    """
    valid = ~masks & (ground_truth != ignore_index)
    index = ground_truth[valid].long() * num_classes + labels[valid].long()
    confmat = torch.bincount(index, minlength=num_classes**2).reshape(num_classes, num_classes)
    scores = scores_from_confusion(confmat)
    defect = [c for c in range(num_classes) if c != background_index]
    iou = scores["iou"][defect]
    miou = float(iou.nanmean()) if bool((~iou.isnan()).any()) else float("nan")
    return {"mIoU": miou, "pixel_acc": float(scores["pixel_acc"])}
