"""Callbacks of the suite: validation prediction overlays, ``per_image.csv``, the pseudo-label diagnostic and the
wall-clock breakdown (the progress bar is in :mod:`semiseg.console`)."""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import time
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
from semiseg.metrics import SegmentationMetrics, image_means

log = logging.getLogger("semiseg.train")

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


def display_image(image: torch.Tensor | np.ndarray) -> np.ndarray:
    """An image as RGB ``(H, W, 3)`` uint8 for display: a uint8 ``(H, W, C)`` array (an image as read from its
    file) is shown as it is; a normalised tensor ``(C, H, W)`` (a batch's image) is min-max scaled to 0-255."""
    if isinstance(image, np.ndarray) and image.dtype == np.uint8:
        picture = image if image.ndim == 3 else image[:, :, None]
    else:
        tensor = torch.as_tensor(image).detach().float().cpu()
        tensor = (tensor - tensor.min()) / (tensor.max() - tensor.min()).clamp_min(1e-8)
        picture = (tensor.permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    if picture.shape[2] == 1:
        picture = np.repeat(picture, 3, axis=2)
    return np.ascontiguousarray(picture[:, :, :3])


def overlay(image: torch.Tensor | np.ndarray, mask: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Image (see :func:`display_image`) and class mask ``(H, W)`` -> RGB overlay ``(H, W, 3)`` uint8: defect
    pixels blended with their class colour (:data:`PALETTE`), every other pixel the image's own."""
    picture = display_image(image)
    blended = picture.copy()
    defect = (mask > 0) & (mask < 255)
    blended[defect] = (alpha * colorize(mask)[defect] + (1 - alpha) * picture[defect]).astype(np.uint8)
    return blended


TEXT_COLOUR = (255, 255, 255)
BAR_COLOUR = (32, 32, 32)


def enlarge(picture: np.ndarray, min_side: int) -> np.ndarray:
    """Scale ``picture (H, W, 3)`` up by a whole factor (nearest neighbour, so class colours stay exact) until its
    shorter side is at least ``min_side``; a picture already that large is returned as it is."""
    factor = max(1, math.ceil(min_side / max(1, min(picture.shape[:2]))))
    return picture if factor == 1 else np.repeat(np.repeat(picture, factor, axis=0), factor, axis=1)


def text_bar(width: int, text: str, height: int = 24) -> np.ndarray:
    """A dark bar ``(height, width, 3)`` with ``text`` in white."""
    bar = np.full((height, width, 3), BAR_COLOUR, dtype=np.uint8)
    cv2.putText(bar, text, (6, height - 8), cv2.FONT_HERSHEY_SIMPLEX, 0.5, TEXT_COLOUR, 1, cv2.LINE_AA)
    return bar


def legend(class_names: Sequence[str], width: int, height: int = 24) -> np.ndarray:
    """A bar ``(rows * height, width, 3)`` with a colour swatch and the name of each defect class (index >= 1),
    in the colours :func:`colorize` gives them; wraps onto more rows when the names do not fit."""
    rows: list[np.ndarray] = []
    bar = np.full((height, width, 3), BAR_COLOUR, dtype=np.uint8)
    x = 6
    for index, name in enumerate(class_names):
        if index == 0:
            continue
        text_width = cv2.getTextSize(name, cv2.FONT_HERSHEY_SIMPLEX, 0.5, 1)[0][0]
        if x + 20 + text_width > width and x > 6:
            rows.append(bar)
            bar, x = np.full((height, width, 3), BAR_COLOUR, dtype=np.uint8), 6
        bar[6 : height - 6, x : x + 12] = PALETTE[index % len(PALETTE)]
        cv2.putText(bar, name, (x + 18, height - 8), cv2.FONT_HERSHEY_SIMPLEX, 0.5, TEXT_COLOUR, 1, cv2.LINE_AA)
        x += 18 + text_width + 14
    rows.append(bar)
    return np.concatenate(rows, axis=0)


def with_legend(picture: np.ndarray, class_names: Sequence[str]) -> np.ndarray:
    """``picture (H, W, 3)`` with the class legend below it."""
    return np.concatenate([picture, legend(class_names, picture.shape[1])], axis=0)


def prediction_grid(
    rows: Sequence[Sequence[np.ndarray]], titles: Sequence[str], class_names: Sequence[str], min_side: int
) -> np.ndarray:
    """Panels ``rows[i][j] (H, W, 3)`` (one row per image, one column per title) enlarged to ``min_side``, with the
    column titles above and the class legend below: ``(title + rows * H' + legend, columns * W', 3)`` uint8."""
    body = np.concatenate([np.concatenate([enlarge(panel, min_side) for panel in row], axis=1) for row in rows], axis=0)
    panel_width = body.shape[1] // max(1, len(titles))
    header = np.concatenate([text_bar(panel_width, title) for title in titles], axis=1)
    header = np.pad(header, ((0, 0), (0, body.shape[1] - header.shape[1]), (0, 0)))
    return with_legend(np.concatenate([header, body], axis=0), class_names)


class PredictionOverlays(Callback):
    """Every ``every_n_validations`` validations, show the first ``num_images`` validation images with
    ground truth and prediction overlaid. Goes to W&B or TensorBoard when such a logger is attached,
    otherwise to ``<run dir>/predictions/step_<step>.png``.

    Args:
        every_n_validations: how often (counted in validation runs; 0 disables it).
        num_images: images per grid.
        output_dir: folder for the PNG fallback.
    """

    def __init__(
        self, every_n_validations: int = 2, num_images: int = 4, output_dir: str | None = None, min_side: int = 256
    ) -> None:
        self.every_n_validations = every_n_validations
        self.num_images = num_images
        self.min_side = min_side
        self.output_dir = Path(output_dir) if output_dir else None
        self._validations = 0
        self._rows: list[list[np.ndarray]] = []

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
            self._rows.append([display_image(image), overlay(image, masks[index]), overlay(image, predictions[index])])

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self._validations += 1
        if not self._rows:
            return
        class_names = list(getattr(pl_module, "class_names", None) or [str(i) for i in range(PALETTE.shape[0])])
        grid = prediction_grid(self._rows, ("image", "ground truth", "prediction"), class_names, self.min_side)
        self._rows = []
        step = trainer.global_step
        shown = False
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(
                    key="val/predictions", images=[grid], caption=["image | ground truth | prediction"], step=step
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


class PseudoLabelQuality(Callback):
    """A diagnostic off the training path: after every validation, how good the method's pseudo-labels are on a
    fixed subset of the unlabeled images, scored against their hidden masks, and how much of those images the
    unsupervised loss uses.

    Logs ``diag/pseudo_label_mIoU`` (IoU over the defect classes, whole subset, on the pixels the loss would use),
    ``diag/pseudo_label_mIoU_all_pixels`` (every pixel) and ``diag/unsup_pixel_share`` (share of pixels used, e.g.
    above FixMatch's confidence threshold), from the module's
    :meth:`~semiseg.methods.base.SemiSupervisedModule.diagnostic_pseudo_labels`.

    The hidden masks never reach training: the subset is read through a dataset of its own
    (``part_dataset("unlabeled", with_masks=True)``), not through the unlabeled training loader (whose batches
    carry no ``mask``); the scoring runs without gradients, in eval mode, with the random number generators
    forked, so the training trajectory is the same with or without this callback.

    Args:
        num_images: size of the subset (0 disables the diagnostic).
        seed: picks the subset (fixed for the whole run).
        batch_size: images per forward pass.
    """

    def __init__(self, num_images: int = 32, seed: int = 0, batch_size: int = 8) -> None:
        self.num_images = num_images
        self.seed = seed
        self.batch_size = batch_size
        self._loader: torch.utils.data.DataLoader | None = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        datamodule = getattr(trainer, "datamodule", None)
        if not self.num_images or datamodule is None or not hasattr(datamodule, "part_dataset"):
            return
        dataset = datamodule.part_dataset("unlabeled", views=datamodule.eval_views, with_masks=True)
        if len(dataset) == 0:
            return
        generator = np.random.default_rng(self.seed)
        chosen = sorted(generator.choice(len(dataset), size=min(self.num_images, len(dataset)), replace=False))
        subset = torch.utils.data.Subset(dataset, [int(i) for i in chosen])
        self._loader = torch.utils.data.DataLoader(subset, batch_size=self.batch_size, shuffle=False, num_workers=0)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or self._loader is None:
            return
        metrics = getattr(pl_module, "val_metrics", None)
        if metrics is None:
            return
        names, ignore_index = metrics.class_names, int(metrics.ignore_index)
        used_pixels = SegmentationMetrics(names, ignore_index=ignore_index).to(pl_module.device)
        all_pixels = SegmentationMetrics(names, ignore_index=ignore_index).to(pl_module.device)
        used_count = total_count = 0
        devices = [pl_module.device] if pl_module.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            for batch in self._loader:
                image = batch["image"].to(pl_module.device)
                mask = batch["mask"].to(pl_module.device)
                labels, used = pl_module.diagnostic_pseudo_labels(image)
                all_pixels.update(labels, mask)
                used_pixels.update(labels, torch.where(used, mask, torch.full_like(mask, ignore_index)))
                valid = mask != ignore_index
                used_count += int((used & valid).sum())
                total_count += int(valid.sum())
        pl_module.log_dict(
            {
                "diag/pseudo_label_mIoU": used_pixels.compute()["mIoU"],
                "diag/pseudo_label_mIoU_all_pixels": all_pixels.compute()["mIoU"],
                "diag/unsup_pixel_share": torch.tensor(used_count / max(1, total_count)),
            },
            on_epoch=True,
            sync_dist=False,
        )


class WallClock(Callback):
    """Where a fit's wall clock goes: the optimisation steps (forward, loss, backward, optimizer step: from
    ``on_train_batch_start`` to ``on_train_batch_end``), validation (sanity check included) and the rest
    (loading the next batch, logging, checkpoints, callbacks). At the end of the fit it logs one line and, on the
    global-zero process, writes ``path`` (JSON): ``fit_seconds``, ``step_seconds``, ``validation_seconds``,
    ``other_seconds``, ``steps`` and ``share_outside_steps`` (1 − step / fit). A resumed fit counts its own part.

    Args:
        path: the JSON file (``None``: only the log line).
    """

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path else None
        self.figures: dict[str, float] = {}
        self._fit_started = self._batch_started = self._validation_started = 0.0
        self._step_seconds = self._validation_seconds = 0.0
        self._steps = 0

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._fit_started = time.perf_counter()
        self._step_seconds = self._validation_seconds = 0.0
        self._steps = 0

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._batch_started = time.perf_counter()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._step_seconds += time.perf_counter() - self._batch_started
        self._steps += 1

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._validation_started = time.perf_counter()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._fit_started:
            self._validation_seconds += time.perf_counter() - self._validation_started

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        fit = time.perf_counter() - self._fit_started
        other = max(0.0, fit - self._step_seconds - self._validation_seconds)
        self.figures = {
            "fit_seconds": round(fit, 3),
            "step_seconds": round(self._step_seconds, 3),
            "validation_seconds": round(self._validation_seconds, 3),
            "other_seconds": round(other, 3),
            "steps": self._steps,
            "share_outside_steps": round(1.0 - self._step_seconds / fit, 4) if fit > 0 else 0.0,
        }
        log.info(
            "wall clock of the fit: %.1f s; optimisation steps %.1f s (%d), validation %.1f s, the rest %.1f s "
            "(%.0f %% outside the steps)",
            fit, self._step_seconds, self._steps, self._validation_seconds, other,
            100 * self.figures["share_outside_steps"],
        )  # fmt: skip
        if self.path is not None and trainer.is_global_zero:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.path, json.dumps(self.figures, indent=2) + "\n")
