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

:class:`PerImageMetrics` computes the convention of the UAPS papers' *test* numbers (``mIoU_image``,
``mDice_image``): each image's mean IoU / Dice over the defect classes present in its ground truth, averaged
over images. Paper tables compare with these, not with the whole-split ``mIoU``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchmetrics import Metric
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


def per_image_scores(
    preds: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int | None = 255
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image, per-class IoU and Dice, defined only for classes present in the image's ground truth.

    Args:
        preds: predicted labels ``(B, H, W)`` (or logits ``(B, C, H, W)``, argmaxed).
        target: true labels ``(B, H, W)``; pixels equal to ``ignore_index`` are left out of both.
        num_classes: number of classes ``C``.
        ignore_index: target value of unlabeled pixels (``None``: none).

    Returns:
        ``iou, dice``, each ``(B, C)`` float64: ``|P ∩ G| / |P ∪ G|`` and ``2 |P ∩ G| / (|P| + |G|)`` for each
        class with at least one pixel in ``G`` (the image's ground truth), NaN for the others; a class predicted
        but absent from the ground truth is therefore never scored (the UAPS test notebooks' rule).
    """
    if preds.ndim == target.ndim + 1:
        preds = preds.argmax(dim=1)
    preds = preds.reshape(preds.shape[0], -1).long()
    target = target.reshape(target.shape[0], -1).long()
    valid = torch.ones_like(target, dtype=torch.bool) if ignore_index is None else target != ignore_index
    classes = torch.arange(num_classes, device=target.device).view(1, -1, 1)
    predicted = (preds.unsqueeze(1) == classes) & valid.unsqueeze(1)  # (B, C, N)
    actual = (target.unsqueeze(1) == classes) & valid.unsqueeze(1)
    intersection = (predicted & actual).sum(-1).to(torch.float64)
    predicted_area = predicted.sum(-1).to(torch.float64)
    actual_area = actual.sum(-1).to(torch.float64)
    present = actual_area > 0
    nan = torch.full_like(intersection, float("nan"))
    iou = torch.where(present, intersection / (predicted_area + actual_area - intersection).clamp_min(1), nan)
    dice = torch.where(present, 2 * intersection / (predicted_area + actual_area).clamp_min(1), nan)
    return iou, dice


class PerImageMetrics(Metric):
    """The papers' per-image metric (the UAPS test notebooks): for each image, the IoU and Dice of every defect
    class present in its ground truth, averaged over those classes; then the mean over images.

    Background is never a class of the mean, and false positives of classes absent from an image are never
    counted. An image whose ground truth holds no defect pixel has no score (the notebooks would return NaN for
    it and so for the whole mean; their test sets hold defective images only): it is left out of the mean over
    images and counted in ``images_without_defect``.

    ``compute()`` returns ``mIoU_image``, ``mDice_image`` and ``images_without_defect``; :meth:`rows` returns
    the per-image, per-class scores accumulated so far (for ``per_image.csv``).

    Args:
        class_names: all class names, background first.
        ignore_index: target value of unlabeled pixels.
        background_index: the class left out of the means.
    """

    full_state_update = False

    def __init__(self, class_names: Sequence[str], ignore_index: int = 255, background_index: int = 0) -> None:
        super().__init__()
        self.class_names = list(class_names)
        self.ignore_index = ignore_index
        self.background_index = background_index
        self.add_state("iou_rows", default=[], dist_reduce_fx="cat")
        self.add_state("dice_rows", default=[], dist_reduce_fx="cat")

    @property
    def defect_classes(self) -> list[int]:
        return [c for c in range(len(self.class_names)) if c != self.background_index]

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        """``preds``: logits ``(B, C, H, W)`` or labels ``(B, H, W)``; ``target``: ``(B, H, W)``."""
        iou, dice = per_image_scores(preds, target, len(self.class_names), self.ignore_index)
        self.iou_rows.append(iou)
        self.dice_rows.append(dice)

    def rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``iou, dice`` ``(N, C)`` of the images seen since the last reset, in update order (this process only)."""
        empty = torch.empty(0, len(self.class_names), dtype=torch.float64)
        iou = torch.cat(self.iou_rows) if self.iou_rows else empty
        dice = torch.cat(self.dice_rows) if self.dice_rows else empty
        return iou, dice

    def compute(self) -> dict[str, torch.Tensor]:  # type: ignore[override]
        iou_rows, dice_rows = self.iou_rows, self.dice_rows
        # after synchronisation the list states are already concatenated tensors
        iou = iou_rows if torch.is_tensor(iou_rows) else (torch.cat(iou_rows) if iou_rows else None)
        dice = dice_rows if torch.is_tensor(dice_rows) else (torch.cat(dice_rows) if dice_rows else None)
        if iou is None or dice is None:
            nan = torch.tensor(float("nan"))
            return {"mIoU_image": nan, "mDice_image": nan, "images_without_defect": torch.tensor(0.0)}
        image_iou = image_means(iou, self.defect_classes)
        image_dice = image_means(dice, self.defect_classes)
        scored = ~image_iou.isnan()
        return {
            "mIoU_image": _nanmean(image_iou).float(),
            "mDice_image": _nanmean(image_dice).float(),
            "images_without_defect": (~scored).sum().float(),
        }


def image_means(scores: torch.Tensor, classes: Sequence[int]) -> torch.Tensor:
    """``scores (N, C)`` (NaN where undefined) -> ``(N,)``: each image's mean over ``classes`` where defined
    (NaN for an image where none is)."""
    selected = scores[:, list(classes)]
    defined = ~selected.isnan()
    count = defined.sum(1)
    total = torch.where(defined, selected, torch.zeros_like(selected)).sum(1)
    return torch.where(count > 0, total / count.clamp_min(1), torch.full_like(total, float("nan")))
