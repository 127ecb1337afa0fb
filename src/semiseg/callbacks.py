"""Callbacks of the suite: validation prediction overlays and ``per_image.csv`` (the progress bar is in
:mod:`semiseg.console`)."""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

from semiseg.io import atomic_write_text
from semiseg.metrics import image_means

# one colour per class index (background black); cycles past the end
PALETTE = np.array(
    [[0, 0, 0], [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
     [145, 30, 180], [70, 240, 240], [240, 50, 230], [210, 245, 60]],
    dtype=np.uint8,
)  # fmt: skip


def colorize(mask: np.ndarray) -> np.ndarray:
    """Class-index mask ``(H, W)`` -> RGB ``(H, W, 3)`` uint8 (ignored pixels grey)."""
    colors = PALETTE[np.mod(mask, len(PALETTE))]
    colors[mask >= 255] = 128
    return colors


def overlay(image: torch.Tensor, mask: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Normalised image ``(C, H, W)`` and mask ``(H, W)`` -> RGB overlay ``(H, W, 3)`` uint8."""
    picture = image.detach().float().cpu()
    picture = (picture - picture.min()) / (picture.max() - picture.min()).clamp_min(1e-8)
    picture = (picture.permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    if picture.shape[2] == 1:
        picture = np.repeat(picture, 3, axis=2)
    blended = picture.copy()
    defect = (mask > 0) & (mask < 255)
    blended[defect] = (alpha * colorize(mask)[defect] + (1 - alpha) * picture[defect]).astype(np.uint8)
    return blended


class PredictionOverlays(Callback):
    """Every ``every_n_validations`` validations, show the first ``num_images`` validation images with
    ground truth and prediction overlaid. Goes to W&B or TensorBoard when such a logger is attached,
    otherwise to ``<run dir>/predictions/step_<step>.png``.

    Args:
        every_n_validations: how often (counted in validation runs; 0 disables it).
        num_images: images per grid.
        output_dir: folder for the PNG fallback.
    """

    def __init__(self, every_n_validations: int = 2, num_images: int = 4, output_dir: str | None = None) -> None:
        self.every_n_validations = every_n_validations
        self.num_images = num_images
        self.output_dir = Path(output_dir) if output_dir else None
        self._validations = 0
        self._rows: list[np.ndarray] = []

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._rows = []

    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if trainer.sanity_checking or not self.every_n_validations or batch_idx != 0:
            return
        if self._validations % self.every_n_validations != 0:
            return
        predictions = outputs.argmax(dim=1).cpu().numpy()
        masks = batch["mask"].cpu().numpy()
        for index in range(min(self.num_images, len(predictions))):
            image = batch["image"][index]
            self._rows.append(
                np.concatenate([overlay(image, masks[index]), overlay(image, predictions[index])], axis=1)
            )

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self._validations += 1
        if not self._rows:
            return
        grid = np.concatenate(self._rows, axis=0)
        self._rows = []
        step = trainer.global_step
        shown = False
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(
                    key="val/predictions", images=[grid], caption=["left: ground truth, right: prediction"], step=step
                )
                shown = True
            elif isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image("val/predictions", grid, global_step=step, dataformats="HWC")
                shown = True
        if not shown and self.output_dir is not None and trainer.is_global_zero:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(self.output_dir / f"step_{step:07d}.png"), cv2.cvtColor(grid, cv2.COLOR_RGB2BGR))


class PerImageCSV(Callback):
    """Write ``per_image.csv`` at the end of every test: one row per test image with its ``id``, the IoU of each
    class in its ground truth (``IoU/<class>``, empty where the class is absent from the image), ``mIoU_image``
    and ``mDice_image`` (means over the defect classes present; empty for an image without defect).

    The scores are those of the module's :class:`~semiseg.metrics.PerImageMetrics` (``image_metrics["test"]``),
    so the file agrees with ``test/mIoU_image``; the ids come from the test batches, in the same order.

    Args:
        path: the file to write (atomically; replaced by every test run).
    """

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self._ids: list[str] = []

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._ids = []

    def on_test_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if "id" in batch:
            self._ids.extend(str(i) for i in batch["id"])
        else:  # a loader without ids (e.g. a custom one): number the images
            self._ids.extend(f"{len(self._ids) + k}" for k in range(batch["image"].shape[0]))

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # callbacks run before the module's own hook, which resets the metric
        metrics = getattr(pl_module, "image_metrics", None)
        if metrics is None or "test" not in metrics:
            return
        metric = metrics["test"]
        iou, dice = metric.rows()
        ids = list(self._ids)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, (ids, iou.cpu(), dice.cpu()))
            ids = [i for part in gathered for i in part[0]]
            iou = torch.cat([part[1] for part in gathered])
            dice = torch.cat([part[2] for part in gathered])
        if len(ids) != iou.shape[0]:
            raise RuntimeError(f"per_image.csv: {len(ids)} test ids for {iou.shape[0]} scored images")
        if trainer.is_global_zero:
            atomic_write_text(self.path, per_image_table(ids, iou, dice, metric.class_names, metric.defect_classes))


def per_image_table(
    ids: Sequence[str], iou: torch.Tensor, dice: torch.Tensor, class_names: Sequence[str], defect_classes: Sequence[int]
) -> str:
    """The text of ``per_image.csv`` from ids and per-image, per-class ``iou``/``dice`` ``(N, C)`` (NaN: undefined)."""
    image_iou = image_means(iou, defect_classes)
    image_dice = image_means(dice, defect_classes)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["id", *(f"IoU/{name}" for name in class_names), "mIoU_image", "mDice_image"])
    for index, image_id in enumerate(ids):
        values = [*iou[index].tolist(), float(image_iou[index]), float(image_dice[index])]
        writer.writerow([image_id, *("" if math.isnan(v) else repr(v) for v in values)])
    return buffer.getvalue()
