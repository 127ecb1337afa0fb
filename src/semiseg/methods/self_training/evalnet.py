"""EvalNet (IM++ / AIM++): a small two-input network that predicts how good a pseudo-label is.

It sees an image ``(B, C, H, W)`` and a label map as one-hot channels ``(B, K, H, W)`` (masked pixels: all
zeros) and predicts the label's IoU with the unknown ground truth in ``[0, 1]``. Each input goes through its
own conv1x1 block and one conv block, the two are concatenated and pass five conv blocks (16α..256α
channels, each conv kxk - act - conv1x1 - act - BN - max-pool), global average pooling and a sigmoid unit,
as in the official code (α = 2 there; ``evalnet.width_multiplier`` here).

It is trained on the labeled images only: their ground-truth masks are randomly perturbed (grown, shrunk,
shifted, parts dropped, blobs added, classes swapped, regions left unknown) and the target is the
perturbed mask's IoU with the truth — the mean over the defect classes present in either, 1 when both are
empty (the suite's background-excluded convention). Then every pseudo-label whose predicted IoU is not
above ``threshold`` (0.75) is dropped; with ``max_extra_copies > 0`` (IM++ / AIM++) a kept image enters the
training set ``1 + round((s - t) / (1 - t) · max_extra_copies)`` times, the copies strongly augmented.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, Dataset

from semiseg.errors import ConfigError
from semiseg.io import atomic_write_json
from semiseg.methods.self_training.pseudo_label_store import PseudoLabels

log = logging.getLogger("semiseg.self_training")

COPY_RULES = ("threshold", "official")
EVALNET_DEFAULTS: dict[str, Any] = {
    "threshold": 0.75,
    "max_extra_copies": 0,
    "width_multiplier": 1.0,
    "max_steps": 300,
    "batch_size": 8,
    "lr": 1e-3,
    "samples_per_image": 20,
    "perturb_prob": 0.5,
    "empty_iou": 0.0,
    "copy_rule": "threshold",  # or official: never drop, 1-5 copies by score between min and max threshold
    "min_threshold": 0.72,  # official rule (ISIC 2018's config.ini values; HeLa 0.59-0.62, SUIM 0.43-0.51)
    "max_threshold": 0.75,
    "max_copies": 5,  # IoU of two masks without any defect pixel: 0 as the official get_IoU_binary; 1 = "perfect"
}


def one_hot_labels(labels: torch.Tensor, masks: torch.Tensor | None, num_classes: int) -> torch.Tensor:
    """``labels (B, H, W)`` and optional ``masks (B, H, W)`` bool -> ``(B, K, H, W)`` float, zero where masked
    or where the label is not a class (ignore)."""
    valid = (labels >= 0) & (labels < num_classes)
    if masks is not None:
        valid &= ~masks
    safe = torch.where(valid, labels, torch.zeros_like(labels)).long()
    return F.one_hot(safe, num_classes).permute(0, 3, 1, 2).float() * valid.unsqueeze(1).float()


class _ConvBlock(nn.Sequential):
    def __init__(self, in_ch: int, out: int, kernel: int = 3) -> None:
        super().__init__(
            nn.Conv2d(in_ch, out, kernel, padding=kernel // 2),
            nn.ReLU(),
            nn.Conv2d(out, out, 1),
            nn.ReLU(),
            nn.BatchNorm2d(out),
            nn.MaxPool2d(2, ceil_mode=True),  # ceil: a 1x1 map stays 1x1 on small images
        )


class EvalNet(nn.Module):
    """``(image (B, C, H, W), labels one-hot (B, K, H, W))`` -> predicted IoU ``(B,)`` in ``[0, 1]``."""

    def __init__(self, in_channels: int, num_classes: int, width_multiplier: float = 1.0) -> None:
        super().__init__()
        w = [max(1, int(base * width_multiplier)) for base in (16, 32, 64, 128, 256)]

        def branch(channels: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(channels, w[0], 1), nn.ReLU(), nn.BatchNorm2d(w[0]), _ConvBlock(w[0], w[0]))

        self.num_classes = num_classes
        self.image_branch = branch(in_channels)
        self.label_branch = branch(num_classes)
        self.trunk = nn.Sequential(_ConvBlock(2 * w[0], w[0]), *[_ConvBlock(w[i - 1], w[i]) for i in range(1, 5)])
        self.head = nn.Linear(w[4], 1)

    def forward(self, image: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        joined = torch.cat([self.image_branch(image), self.label_branch(labels)], dim=1)
        return torch.sigmoid(self.head(self.trunk(joined).mean(dim=(2, 3)))).squeeze(1)


def label_iou(
    prediction: np.ndarray, truth: np.ndarray, num_classes: int, ignore_index: int, empty_iou: float = 0.0
) -> float:
    """Mean IoU over the defect classes (1..K-1) present in either map, on pixels known in both; ``empty_iou``
    if none is (the official ``get_IoU_binary`` gives 0 = 0 / (0 + 1e-7) for two empty masks; 1 would make an
    empty pseudo-label look perfect, which favours empty pseudo-labels on defect data)."""
    known = (prediction != ignore_index) & (truth != ignore_index)
    scores = []
    for label in range(1, num_classes):
        pred, true = (prediction == label) & known, (truth == label) & known
        union = np.logical_or(pred, true).sum()
        if union:
            scores.append(np.logical_and(pred, true).sum() / union)
    return float(np.mean(scores)) if scores else float(empty_iou)


def perturb_mask(
    mask: np.ndarray, rng: np.random.Generator, num_classes: int, ignore_index: int, prob: float = 0.5
) -> np.ndarray:
    """A randomly damaged copy of ``mask (H, W)``: each perturbation fires with probability ``prob``."""
    out = mask.copy()
    height, width = out.shape
    size = max(3, min(height, width) // 8)
    if rng.random() < prob:  # grow or shrink the defects
        kernel = np.ones((int(rng.integers(2, size + 1)),) * 2, np.uint8)
        foreground = (out > 0) & (out != ignore_index)
        changed = cv2.dilate(foreground.astype(np.uint8), kernel) if rng.random() < 0.5 else None
        if changed is not None:  # grown pixels take the class of a neighbouring defect
            grown = cv2.dilate(np.where(foreground, out, 0).astype(np.uint8), kernel)
            out = np.where((changed > 0) & ~foreground, grown, out)
        else:
            shrunk = cv2.erode(foreground.astype(np.uint8), kernel) > 0
            out = np.where(foreground & ~shrunk, 0, out)
    if rng.random() < prob:  # drop some defect regions
        count, components = cv2.connectedComponents(((out > 0) & (out != ignore_index)).astype(np.uint8))
        for component in range(1, count):
            if rng.random() < 0.5:
                out[components == component] = 0
    if rng.random() < prob:  # add a false defect
        centre = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        axes = (int(rng.integers(1, size + 1)), int(rng.integers(1, size + 1)))
        blob = np.zeros((height, width), np.uint8)
        cv2.ellipse(blob, centre, axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)
        out[blob > 0] = int(rng.integers(1, num_classes))
    if rng.random() < prob and num_classes > 2:  # wrong class
        foreground = (out > 0) & (out != ignore_index)
        out[foreground] = int(rng.integers(1, num_classes))
    if rng.random() < prob:  # misplaced
        out = np.roll(out, (int(rng.integers(-size, size + 1)), int(rng.integers(-size, size + 1))), axis=(0, 1))
    if rng.random() < prob:  # a region left unknown, like an inconsistency mask
        top, left = int(rng.integers(0, height)), int(rng.integers(0, width))
        out[top : top + size, left : left + size] = ignore_index
    return out


class PerturbedMasks(Dataset):
    """``samples_per_image`` perturbed copies of each labeled item ``{"image", "mask"}`` ->
    ``{"image", "labels" (K, H, W), "iou" ()}``."""

    def __init__(
        self,
        labeled: Dataset,
        num_classes: int,
        ignore_index: int,
        samples_per_image: int,
        prob: float,
        empty_iou: float = 0.0,
    ) -> None:
        self.labeled = labeled
        self.empty_iou = empty_iou
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.samples_per_image = samples_per_image
        self.prob = prob

    def __len__(self) -> int:
        return len(self.labeled) * self.samples_per_image  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        item = self.labeled[index % len(self.labeled)]  # type: ignore[arg-type]
        truth = item["mask"].numpy()
        rng = np.random.default_rng([int(torch.initial_seed()) % 2**32, index, int(torch.randint(2**31, ()))])
        noisy = perturb_mask(truth, rng, self.num_classes, self.ignore_index, self.prob)
        labels = one_hot_labels(torch.from_numpy(noisy)[None], None, self.num_classes)[0]
        iou = label_iou(noisy, truth, self.num_classes, self.ignore_index, self.empty_iou)
        return {"image": item["image"], "labels": labels, "iou": torch.tensor(iou, dtype=torch.float32)}


class EvalNetModule(L.LightningModule):
    """Trains :class:`EvalNet` with the MSE between predicted and true IoU."""

    def __init__(self, in_channels: int, num_classes: int, width_multiplier: float = 1.0, lr: float = 1e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = EvalNet(in_channels, num_classes, width_multiplier)
        self.lr = lr

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = F.mse_loss(self.net(batch["image"], batch["labels"]), batch["iou"])
        self.log("evalnet/loss", loss, prog_bar=True, batch_size=batch["image"].shape[0])
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.net.parameters(), lr=self.lr)


def evalnet_options(config: Mapping[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(config) - set(EVALNET_DEFAULTS))
    if unknown:
        raise ConfigError(f"method.evalnet has no option(s) {unknown}; it takes {sorted(EVALNET_DEFAULTS)}")
    options = {**EVALNET_DEFAULTS, **config}
    if not 0.0 <= float(options["threshold"]) < 1.0:
        raise ConfigError(f"method.evalnet.threshold={options['threshold']} must lie in [0, 1)")
    if int(options["max_extra_copies"]) < 0:
        raise ConfigError(f"method.evalnet.max_extra_copies={options['max_extra_copies']} must be >= 0")
    if options["copy_rule"] not in COPY_RULES:
        raise ConfigError(f"method.evalnet.copy_rule={options['copy_rule']!r} must be one of {list(COPY_RULES)}")
    if not float(options["min_threshold"]) < float(options["max_threshold"]):
        raise ConfigError(
            f"method.evalnet.min_threshold={options['min_threshold']} must be below max_threshold="
            f"{options['max_threshold']}"
        )
    return options


def copies_from_scores(scores: np.ndarray, threshold: float, max_extra_copies: int = 0) -> np.ndarray:
    """How often each pseudo-labeled image enters the training set: 0 unless its score is above
    ``threshold``; then ``1 + round((s - t) / (1 - t) · max_extra_copies)``."""
    scores = np.asarray(scores, dtype=np.float64)
    keep = scores > threshold
    extra = np.rint(np.clip((scores - threshold) / (1.0 - threshold), 0.0, 1.0) * max_extra_copies)
    return np.where(keep, 1 + extra, 0).astype(np.int64)


def official_copies(scores: np.ndarray, min_threshold: float, max_threshold: float, max_copies: int = 5) -> np.ndarray:
    """The official EvalNet copy rule (``create_augment_images_and_masks_with_evalnet_ensemble_binary``): no
    image is dropped; ``max_copies`` above ``max_threshold``, ``1 + int((s - min) / step)`` between the two
    thresholds (``step = (max - min) / max_copies``, capped at ``max_copies``), 1 below ``min_threshold``."""
    scores = np.asarray(scores, dtype=np.float64)
    step = (max_threshold - min_threshold) / max_copies
    between = 1 + np.floor((scores - min_threshold) / step)
    copies = np.where(scores > max_threshold, max_copies, np.where(scores > min_threshold, between, 1))
    return np.minimum(copies, max_copies).astype(np.int64)


@torch.no_grad()
def score_pseudo_labels(
    evalnet: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    images: Sequence[tuple[list[str], torch.Tensor]],
    pseudo: PseudoLabels,
    num_classes: int,
    device: torch.device | str = "cpu",
) -> np.ndarray:
    """EvalNet's score ``(N,)`` of every pseudo-label; ``images`` yields ``(ids, image batch)``."""
    rows = {sample_id: row for row, sample_id in enumerate(pseudo.ids)}
    scores = np.full(len(pseudo), np.nan, dtype=np.float32)
    for ids, image in images:
        index = [rows[i] for i in ids]
        labels = torch.from_numpy(pseudo.labels[index]).long()
        masks = torch.from_numpy(pseudo.masks[index])
        onehot = one_hot_labels(labels, masks, num_classes).to(device)
        scores[index] = evalnet(image.to(device), onehot).float().cpu().numpy()
    return scores


@dataclass
class EvalNetSetting:
    """What EvalNet needs from the run: where it keeps its files, the run's data and dataset facts, and where
    it trains (``accelerator``) and scores (``device``)."""

    folder: Path
    datamodule: Any  # the run's SelfTrainingDataModule: labeled images to train on, unlabeled ones to score
    in_channels: int
    num_classes: int
    ignore_index: int
    accelerator: str = "cpu"
    device: torch.device | str = "cpu"
    fast_dev_run: bool = False


def train_evalnet(setting: EvalNetSetting, options: Mapping[str, Any]) -> EvalNet:
    """Train EvalNet on the labeled images (or reload it from ``<folder>/model.pt``)."""
    folder = setting.folder
    weights = folder / "model.pt"
    module = EvalNetModule(setting.in_channels, setting.num_classes, float(options["width_multiplier"]),
                           float(options["lr"]))  # fmt: skip
    if weights.is_file():
        module.net.load_state_dict(torch.load(weights, map_location="cpu"))
        return module.net.to(setting.device).eval()
    datamodule = setting.datamodule
    data = PerturbedMasks(
        datamodule.part_dataset("labeled"),
        setting.num_classes,
        setting.ignore_index,
        int(options["samples_per_image"]),
        float(options["perturb_prob"]),
        float(options["empty_iou"]),
    )
    batch_size = int(options["batch_size"])
    loader = datamodule._loader(data, batch_size, train=True)
    trainer = L.Trainer(
        max_steps=1 if setting.fast_dev_run else int(options["max_steps"]),
        max_epochs=-1,
        accelerator=setting.accelerator,
        devices=1,
        logger=CSVLogger(str(folder), name="csv", version=""),
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        log_every_n_steps=10,
        default_root_dir=str(folder),
    )
    trainer.fit(module, train_dataloaders=loader)
    Path(folder).mkdir(parents=True, exist_ok=True)
    torch.save(module.net.state_dict(), weights)
    atomic_write_json(folder / "evalnet.json", {"steps": int(trainer.global_step), **dict(options)})
    return module.net.to(setting.device).eval()


def filter_with_evalnet(setting: EvalNetSetting, config: Mapping[str, Any], pseudo: PseudoLabels) -> dict[str, Any]:
    """Score ``pseudo`` with EvalNet (options: ``config``, i.e. ``method.evalnet``) and set its ``scores`` and
    ``copies``; return a summary."""
    options = evalnet_options(config)
    evalnet = train_evalnet(setting, options)
    datamodule = setting.datamodule
    loader: DataLoader = datamodule._loader(
        datamodule.part_dataset("unlabeled", views=datamodule.eval_views, with_masks=False),
        datamodule.batch_size_eval,
        train=False,
    )
    batches = ((list(batch["id"]), batch["image"]) for batch in loader)
    pseudo.scores = score_pseudo_labels(evalnet, batches, pseudo, setting.num_classes, setting.device)
    if options["copy_rule"] == "official":
        copies = official_copies(
            pseudo.scores, float(options["min_threshold"]), float(options["max_threshold"]), int(options["max_copies"])
        )
    else:
        copies = copies_from_scores(pseudo.scores, float(options["threshold"]), int(options["max_extra_copies"]))
    pseudo.copies = np.where(pseudo.copies > 0, copies, 0)  # images the keep filter dropped stay dropped
    kept = int((pseudo.copies > 0).sum())
    log.info("EvalNet kept %d of %d pseudo-labels (threshold %s)", kept, len(pseudo), options["threshold"])
    return {
        "threshold": float(options["threshold"]),
        "mean_score": float(np.nanmean(pseudo.scores)) if len(pseudo) else None,
        "kept": kept,
    }
