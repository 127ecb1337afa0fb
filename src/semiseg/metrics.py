"""Segmentation metrics accumulated over a whole split (torchmetrics; synchronised under DDP).

From one confusion matrix ``M`` (rows: true class, columns: predicted class, ignored pixels left out):

* ``IoU/<class>`` = TP / (TP + FP + FN), ``Dice/<class>`` = 2TP / (2TP + FP + FN);
* ``mIoU`` and ``mDice``: means over the defect classes (background excluded, the UAPS convention);
* ``mIoU_all``: mean IoU over all classes; ``pixel_acc``: trace(M) / sum(M).

A class that appears neither in the targets nor in the predictions of the whole split has no IoU (NaN)
and is left out of the means; a class predicted but absent from the targets scores 0.

``per_batch=True`` adds ``mIoU_batch`` and ``mDice_batch``: the UAPS code's convention, where each
batch's mean over the defect classes *present in that batch's targets* is averaged over batches
(false positives of absent classes are not counted there). Use it only to compare with numbers from
that code.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchmetrics.classification import MulticlassConfusionMatrix


def scores_from_confusion(confmat: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-class IoU and Dice ``(C,)`` (NaN where undefined) and pixel accuracy from ``confmat (C, C)``."""
    confmat = confmat.to(torch.float64)
    true_positive = confmat.diagonal()
    false_positive = confmat.sum(0) - true_positive
    false_negative = confmat.sum(1) - true_positive
    union = true_positive + false_positive + false_negative
    nan = torch.full_like(true_positive, float("nan"))
    iou = torch.where(union > 0, true_positive / union.clamp_min(1), nan)
    dice = torch.where(union > 0, 2 * true_positive / (union + true_positive).clamp_min(1), nan)
    total = confmat.sum()
    pixel_acc = true_positive.sum() / total if total > 0 else torch.tensor(float("nan"), dtype=torch.float64)
    return {"iou": iou, "dice": dice, "pixel_acc": pixel_acc}


def _nanmean(values: torch.Tensor) -> torch.Tensor:
    return values.nanmean() if bool((~values.isnan()).any()) else torch.tensor(float("nan"), dtype=values.dtype)


class SegmentationMetrics(MulticlassConfusionMatrix):
    """Confusion-matrix based segmentation metrics; ``compute()`` returns a flat dict of named scalars.

    Args:
        class_names: all class names, background first.
        ignore_index: target value of unlabeled pixels.
        background_index: class left out of ``mIoU`` and ``mDice``.
        per_batch: also compute the UAPS-code per-batch averages.
    """

    full_state_update = False

    def __init__(
        self,
        class_names: Sequence[str],
        ignore_index: int = 255,
        background_index: int = 0,
        per_batch: bool = False,
    ) -> None:
        super().__init__(num_classes=len(class_names), ignore_index=ignore_index, validate_args=False)
        self.class_names = list(class_names)
        self.background_index = background_index
        self.per_batch = per_batch
        self.add_state("batch_miou_sum", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("batch_mdice_sum", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("batch_count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    @property
    def defect_classes(self) -> list[int]:
        return [c for c in range(len(self.class_names)) if c != self.background_index]

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        """``preds``: logits ``(B, C, H, W)`` or labels ``(B, H, W)``; ``target``: ``(B, H, W)``."""
        if preds.ndim == target.ndim + 1:
            preds = preds.argmax(dim=1)
        if not self.per_batch:
            super().update(preds, target)
            return
        before = self.confmat.clone()
        super().update(preds, target)
        batch = scores_from_confusion(self.confmat - before)
        present = (self.confmat - before).sum(1)[self.defect_classes] > 0
        if bool(present.any()):
            self.batch_miou_sum += batch["iou"][self.defect_classes][present].nanmean()
            self.batch_mdice_sum += batch["dice"][self.defect_classes][present].nanmean()
            self.batch_count += 1

    def compute(self) -> dict[str, torch.Tensor]:  # type: ignore[override]
        scores = scores_from_confusion(self.confmat)
        defect = self.defect_classes
        result = {
            "mIoU": _nanmean(scores["iou"][defect]),
            "mDice": _nanmean(scores["dice"][defect]),
            "mIoU_all": _nanmean(scores["iou"]),
            "pixel_acc": scores["pixel_acc"],
        }
        for index, name in enumerate(self.class_names):
            result[f"IoU/{name}"] = scores["iou"][index]
        for index in defect:
            result[f"Dice/{self.class_names[index]}"] = scores["dice"][index]
        if self.per_batch:
            count = self.batch_count.clamp_min(1)
            result["mIoU_batch"] = self.batch_miou_sum / count
            result["mDice_batch"] = self.batch_mdice_sum / count
        return {key: value.float() for key, value in result.items()}
