"""Metrics against hand-computed confusion matrices."""

from __future__ import annotations

import math

import pytest
import torch

from semiseg.metrics import SegmentationMetrics


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
