"""Metrics against hand-computed confusion matrices."""

from __future__ import annotations

import csv
import io
import math

import pytest
import torch

from semiseg.callbacks import per_image_table
from semiseg.metrics import PerImageMetrics, SegmentationMetrics, per_image_scores


def test_scores_from_a_hand_computed_confusion_matrix() -> None:
    # 3 classes; true rows / predicted columns after the two batches below:
    # true 0: 3 -> 0, 1 -> 1 ; true 1: 1 -> 1, 1 -> 2 ... built pixel by pixel
    target = torch.tensor([[[0, 0, 0, 0], [1, 1, 2, 255]]])
    preds = torch.tensor([[[0, 0, 0, 1], [1, 2, 2, 0]]])
    metrics = SegmentationMetrics(["bg", "a", "b"], ignore_index=255)
    metrics.update(preds, target)
    # confusion: bg: TP 3, FN 1 (->a), FP 0 ; a: TP 1, FP 1, FN 1 ; b: TP 1, FP 1, FN 0
    assert metrics.confmat.tolist() == [[3, 1, 0], [0, 1, 1], [0, 0, 1]]
    scores = metrics.compute()
    assert scores["IoU/bg"] == pytest.approx(3 / 4)
    assert scores["IoU/a"] == pytest.approx(1 / 3)
    assert scores["IoU/b"] == pytest.approx(1 / 2)
    assert scores["mIoU"] == pytest.approx((1 / 3 + 1 / 2) / 2)
    assert scores["mIoU_all"] == pytest.approx((3 / 4 + 1 / 3 + 1 / 2) / 3)
    assert scores["Dice/a"] == pytest.approx(2 / 4)
    assert scores["mDice"] == pytest.approx((2 / 4 + 2 / 3) / 2)
    assert scores["pixel_acc"] == pytest.approx(5 / 7)


def test_accumulates_over_batches_not_averaged() -> None:
    metrics = SegmentationMetrics(["bg", "a"])
    metrics.update(torch.tensor([[1, 1, 1, 1]]), torch.tensor([[1, 1, 1, 1]]))  # IoU_a 1
    metrics.update(torch.tensor([[0, 0, 0, 1]]), torch.tensor([[1, 1, 1, 1]]))  # IoU_a 1/4
    assert metrics.compute()["IoU/a"] == pytest.approx(5 / 8)


def test_logits_are_argmaxed() -> None:
    logits = torch.zeros(1, 2, 1, 2)
    logits[0, 1, 0, 0] = 5.0
    metrics = SegmentationMetrics(["bg", "a"])
    metrics.update(logits, torch.tensor([[[1, 0]]]))
    assert metrics.compute()["mIoU"] == pytest.approx(1.0)


def test_absent_class_is_left_out_and_false_positive_counts_zero() -> None:
    metrics = SegmentationMetrics(["bg", "a", "b"])
    metrics.update(torch.tensor([[0, 1, 0]]), torch.tensor([[0, 1, 0]]))
    scores = metrics.compute()
    assert math.isnan(scores["IoU/b"]) and scores["mIoU"] == pytest.approx(1.0)
    metrics.update(torch.tensor([[2]]), torch.tensor([[0]]))
    assert metrics.compute()["IoU/b"] == 0.0


def test_per_batch_variant_follows_the_uaps_code() -> None:
    metrics = SegmentationMetrics(["bg", "a", "b"], per_batch=True)
    metrics.update(torch.tensor([[1, 1, 2, 2]]), torch.tensor([[1, 1, 1, 1]]))  # a: 2/4; b absent -> ignored
    metrics.update(torch.tensor([[0, 0]]), torch.tensor([[0, 0]]))  # no defect: batch not counted
    scores = metrics.compute()
    assert scores["mIoU_batch"] == pytest.approx(0.5)
    assert scores["IoU/b"] == 0.0  # the whole-split metric counts the false positives


# ---- the papers' per-image convention (UAPS test notebooks) ------------------------------------------------------
# three 2x4 images, classes bg, a, b, c
PER_IMAGE_TARGET = torch.tensor(
    [
        [[1, 1, 0, 0], [0, 0, 0, 0]],  # a only
        [[1, 1, 2, 2], [0, 0, 0, 0]],  # a and b
        [[0, 0, 0, 0], [0, 0, 0, 0]],  # no defect
    ]
)
PER_IMAGE_PREDS = torch.tensor(
    [
        [[1, 0, 0, 2], [0, 0, 0, 0]],  # a: I 1, |P| 1, |G| 2 -> IoU 1/2, Dice 2/3; b predicted but absent: not scored
        [[1, 1, 1, 0], [0, 0, 0, 0]],  # a: I 2, |P| 3, |G| 2 -> 2/3, 4/5; b: missed -> 0, 0
        [[3, 3, 0, 0], [0, 0, 0, 0]],  # nothing to score (false positives of c never counted)
    ]
)


def test_per_image_scores_follow_the_notebooks_rule() -> None:
    iou, dice = per_image_scores(PER_IMAGE_PREDS, PER_IMAGE_TARGET, num_classes=4)
    nan = float("nan")
    assert torch.allclose(iou[:, 1:], torch.tensor([[1 / 2, nan, nan], [2 / 3, 0, nan], [nan, nan, nan]],
                                                   dtype=torch.float64), equal_nan=True)  # fmt: skip
    assert torch.allclose(dice[:, 1:], torch.tensor([[2 / 3, nan, nan], [4 / 5, 0, nan], [nan, nan, nan]],
                                                    dtype=torch.float64), equal_nan=True)  # fmt: skip
    # background is scored where present (for per_image.csv) but never enters the means: image 1 bg: I 5, U 7
    assert iou[0, 0] == pytest.approx(5 / 7)


def test_per_image_means_over_present_classes_then_images() -> None:
    metric = PerImageMetrics(["bg", "a", "b", "c"])
    metric.update(PER_IMAGE_PREDS[:2], PER_IMAGE_TARGET[:2])  # two batches: the result cannot depend on batching
    metric.update(PER_IMAGE_PREDS[2:], PER_IMAGE_TARGET[2:])
    scores = metric.compute()
    # image means: IoU 1/2 and (2/3 + 0)/2 = 1/3; Dice 2/3 and 2/5; the image without defect is left out
    assert scores["mIoU_image"] == pytest.approx((1 / 2 + 1 / 3) / 2)
    assert scores["mDice_image"] == pytest.approx((2 / 3 + 2 / 5) / 2)
    assert scores["images_without_defect"] == 1
    # the whole-split metric on the same pixels differs: c's false positives count, the IoUs pool pixels
    split = SegmentationMetrics(["bg", "a", "b", "c"])
    split.update(PER_IMAGE_PREDS, PER_IMAGE_TARGET)
    assert split.compute()["mIoU"] == pytest.approx((3 / 5 + 0 + 0) / 3)  # a: I 3, U 5; b and c: 0


def test_per_image_leaves_ignored_pixels_out_and_takes_logits() -> None:
    target = torch.tensor([[[1, 1, 255, 255]]])
    preds = torch.tensor([[[1, 0, 1, 1]]])
    logits = torch.nn.functional.one_hot(preds, 2).permute(0, 3, 1, 2).float()
    metric = PerImageMetrics(["bg", "a"], ignore_index=255)
    metric.update(logits, target)
    assert metric.compute()["mIoU_image"] == pytest.approx(1 / 2)  # the predictions on ignored pixels do not count


def test_per_image_table_writes_empty_cells_where_undefined() -> None:
    iou, dice = per_image_scores(PER_IMAGE_PREDS, PER_IMAGE_TARGET, num_classes=4)
    text = per_image_table(["x", "y", "z"], iou, dice, ["bg", "a", "b", "c"], [1, 2, 3])
    rows = list(csv.DictReader(io.StringIO(text)))
    assert list(rows[0]) == ["id", "IoU/bg", "IoU/a", "IoU/b", "IoU/c", "mIoU_image", "mDice_image"]
    assert [r["id"] for r in rows] == ["x", "y", "z"]
    assert float(rows[0]["IoU/a"]) == pytest.approx(0.5) and rows[0]["IoU/b"] == "" and rows[0]["IoU/c"] == ""
    assert float(rows[1]["mIoU_image"]) == pytest.approx(1 / 3)
    assert rows[2]["mIoU_image"] == "" and float(rows[2]["IoU/bg"]) == pytest.approx(6 / 8)
