"""EvalNet (IM++ / AIM++): a small two-input network that predicts how good a pseudo-label is.

It sees an image ``(B, C, H, W)`` and a label map as one-hot channels ``(B, K, H, W)`` (masked pixels: all
zeros) and predicts the label's IoU with the unknown ground truth in ``[0, 1]``. Each input goes through its
own conv1x1 block and one conv block, the two are concatenated and pass five conv blocks (16α..256α
channels, each conv kxk - act - conv1x1 - act - BN - max-pool), global average pooling and a sigmoid unit,
as in the official code (α = 2 there; ``evalnet.width_multiplier`` here).

Training data (``evalnet.training_data``):

* ``ldt_predictions`` (the official ``create_training_data_evalnet_im_binary``, the default): real
  Inconsistency-Mask pseudo-labels of the labeled images. For each of ``num_loops`` passes and each labeled
  image, a random subset of 2-4 (``min_models``..``max_models``) of the generation-0 (LDT) students votes; where
  they disagree the pixels are masked, the mask is eroded and then dilated with kernels drawn from
  ``morph_kernels`` (0, 3, 5), masked pixels are blacked out in the image and set to background in the label,
  and the target is the label's IoU with the truth (0 for two defect-free masks, as ``get_IoU_binary``); half
  the samples are augmented (:func:`augment_with_masks`, the official strength, no rotation). Validation data:
  the same from the validation images (``num_loops_val`` passes).
* ``perturbed_truth`` (this suite's earlier scheme): the labeled ground-truth masks randomly perturbed (grown,
  shrunk, shifted, parts dropped, blobs added, classes swapped, regions left unknown).

``num_evalnets`` EvalNets are trained (MSE to the target IoU); the ``ensemble_size`` with the lowest
validation MAE score the pseudo-labels, their scores averaged (official: 5 trained, the best ``n`` used).

Copies (``evalnet.copy_rule``): ``official`` (the default) never drops a pseudo-label: ``max_copies`` above
``max_threshold``, ``1 + int((s - min) / step)`` between the thresholds, 1 below (the thresholds are
dataset-specific in the official config: ISIC 0.72-0.75, HeLa 0.59-0.62, SUIM 0.43-0.51); ``threshold`` drops
every pseudo-label whose score is not above ``threshold`` and adds ``round((s - t) / (1 - t) ·
max_extra_copies)`` copies to the others.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
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
from semiseg.io import atomic_save, atomic_write_json
from semiseg.methods.self_training.masks import hard_labels, morph_mask
from semiseg.methods.self_training.offline_augment import PhotometricNoise, augment_with_masks
from semiseg.methods.self_training.pseudo_label_store import PseudoLabels
from semiseg.resume import rng_states, set_rng_states

log = logging.getLogger("semiseg.self_training")

COPY_RULES = ("threshold", "official")
TRAINING_DATA = ("ldt_predictions", "perturbed_truth")
EVALNET_DEFAULTS: dict[str, Any] = {
    "training_data": "ldt_predictions",
    "num_loops": 10,  # official NUM_LOOPS_TRAIN: passes over the labeled images (ldt_predictions)
    "num_loops_val": 3,  # official NUM_LOOPS_VAL: passes over the validation images
    "min_models": 2,  # LDT students voting in one sample: uniform in min..max (official 2..4)
    "max_models": 4,
    "morph_kernels": [0, 3, 5],  # erosion and dilation kernels of the sampled masks (official kernel_list)
    "augment_prob": 0.5,  # share of samples augmented (official: random() < 0.5)
    "num_evalnets": 5,  # EvalNets trained (official 5)
    "ensemble_size": 2,  # the best (lowest validation MAE) that score; official n = the number of teachers, 2..4
    "threshold": 0.75,
    "max_extra_copies": 0,
    "width_multiplier": 1.0,
    "max_steps": 300,
    "batch_size": 8,
    "lr": 1e-3,
    "samples_per_image": 20,
    "perturb_prob": 0.5,
    "empty_iou": 0.0,
    "copy_rule": "official",  # or threshold: never drop, 1-5 copies by score between min and max threshold
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
    if options["training_data"] not in TRAINING_DATA:
        raise ConfigError(
            f"method.evalnet.training_data={options['training_data']!r} must be one of {list(TRAINING_DATA)}"
        )
    for key in ("num_loops", "num_loops_val", "num_evalnets", "ensemble_size", "min_models", "max_models"):
        if isinstance(options[key], bool) or not isinstance(options[key], int) or options[key] < 1:
            raise ConfigError(f"method.evalnet.{key}={options[key]!r} must be a positive integer")
    if options["ensemble_size"] > options["num_evalnets"]:
        raise ConfigError(
            f"method.evalnet.ensemble_size={options['ensemble_size']} exceeds num_evalnets={options['num_evalnets']}"
        )
    if not 2 <= options["min_models"] <= options["max_models"]:
        raise ConfigError(
            f"method.evalnet.min_models={options['min_models']}, max_models={options['max_models']}: an "
            "Inconsistency Mask needs 2 <= min_models <= max_models"
        )
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
    images: Iterable[tuple[list[str], torch.Tensor]],
    pseudo: PseudoLabels,
    num_classes: int,
    device: torch.device | str = "cpu",
    black: torch.Tensor | None = None,
) -> np.ndarray:
    """EvalNet's score ``(N,)`` of every pseudo-label; ``images`` yields ``(ids, image batch (B, C, H, W))``;
    ``black (C,)``: the normalised value of a black pixel, set where a pseudo-label is masked (as EvalNet saw
    its ``ldt_predictions`` training images; ``None``: images as they are)."""
    rows = {sample_id: row for row, sample_id in enumerate(pseudo.ids)}
    scores = np.full(len(pseudo), np.nan, dtype=np.float32)
    for ids, image in images:
        index = [rows[i] for i in ids]
        labels = torch.from_numpy(pseudo.labels[index]).long()
        masks = torch.from_numpy(pseudo.masks[index])
        onehot = one_hot_labels(labels, masks, num_classes).to(device)
        if black is not None:
            image = torch.where(masks[:, None], black.to(image)[None, :, None, None], image)
        scores[index] = evalnet(image.to(device), onehot).float().cpu().numpy()
    return scores


# ---- training data from real predictions of the LDT students (the official scheme) --------------------------
def resized_part(datamodule: Any, part: str) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The images ``(H, W, C)`` uint8 and masks ``(H, W)`` of a split part at the evaluation size (no
    augmentation, not normalised)."""
    images, masks = [], []
    for sample in datamodule.parts[part]:
        image, mask = datamodule.dataset.load(sample)
        if mask is None:
            raise ConfigError(f"EvalNet needs the masks of the {part} images; {sample.id} has none")
        out = datamodule.eval_views.geometry(image=image, mask=mask)
        images.append(np.asarray(out["image"]))
        masks.append(np.asarray(out["mask"]))
    return images, masks


@torch.no_grad()
def ldt_votes(
    predictors: Sequence[Callable[[torch.Tensor], torch.Tensor]],
    images: Sequence[np.ndarray],
    normalise: Callable[[np.ndarray], torch.Tensor],
    device: torch.device | str = "cpu",
    binary_threshold: float = 0.5,
    batch_size: int = 16,
) -> np.ndarray:
    """Every predictor's hard labels on every image: ``(M, N, H, W)`` uint8, ``batch_size`` images a pass (the
    images share the evaluation size; the predictors are in eval mode, so batching does not change a label)."""
    votes = np.zeros((len(predictors), len(images), *images[0].shape[:2]), dtype=np.uint8)
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        tensor = torch.stack([normalise(image) for image in chunk]).to(device)
        for model, predict in enumerate(predictors):
            votes[model, start : start + len(chunk)] = hard_labels(predict(tensor), binary_threshold).cpu().numpy()
    return votes


# the official evalnet training copies: augment_image_and_mask's default strength, no quarter turns
EVALNET_SAMPLE_NOISE = PhotometricNoise(
    max_blur=3, max_noise=20, brightness_alpha=(0.6, 1.4), brightness_beta=(-20.0, 20.0), free_rotation=False
)


def ldt_sample(
    image: np.ndarray,
    truth: np.ndarray,
    votes: np.ndarray,
    rng: np.random.Generator,
    options: Mapping[str, Any],
    num_classes: int,
    ignore_index: int,
    background_index: int = 0,
) -> tuple[np.ndarray, np.ndarray, float]:
    """One EvalNet training sample from the LDT students' ``votes (M, H, W)`` on ``image (H, W, C)`` uint8 with
    ground truth ``truth (H, W)``.

    A random subset of ``min_models..max_models`` students (at most ``M``) votes; where they disagree the
    pixels are masked, the mask is eroded, then dilated, with kernels drawn from ``morph_kernels``; masked
    pixels are black in the image and background in the label whose IoU with ``truth`` is the target; with
    probability ``augment_prob`` image, label and mask get :data:`EVALNET_SAMPLE_NOISE`.

    Returns:
        ``image (H, W, C)`` uint8, ``label (H, W)`` int64 (``ignore_index`` where masked: EvalNet sees no class
        there) and the target IoU.
    """
    count = int(rng.integers(int(options["min_models"]), min(int(options["max_models"]), len(votes)) + 1))
    chosen = votes[np.sort(rng.choice(len(votes), size=count, replace=False))]
    agree = (chosen == chosen[:1]).all(axis=0)
    kernels = [int(k) for k in options["morph_kernels"]]
    erode, dilate = int(rng.choice(kernels)), int(rng.choice(kernels))
    masked = morph_mask(torch.from_numpy(~agree)[None], dilate_kernel=dilate, erode_kernel=erode)[0].numpy()
    label = np.where(masked, background_index, chosen[0]).astype(np.int64)
    target = label_iou(label, truth, num_classes, ignore_index, float(options["empty_iou"]))
    picture = image.copy()
    picture[masked] = 0
    if rng.random() < float(options["augment_prob"]):
        layers = [label, masked.astype(np.uint8)]
        picture, (label, moved) = augment_with_masks(picture, layers, EVALNET_SAMPLE_NOISE, rng)
        masked = moved.astype(bool)
    return picture, np.where(masked, ignore_index, label), target


class EvalNetSamples(Dataset):
    """Prepared EvalNet samples ``(image (H, W, C) uint8, label (H, W), iou)`` -> ``{"image" (C, H, W),
    "labels" (K, H, W), "iou" ()}``."""

    def __init__(
        self,
        samples: Sequence[tuple[np.ndarray, np.ndarray, float]],
        normalise: Callable[[np.ndarray], torch.Tensor],
        num_classes: int,
    ) -> None:
        self.samples = samples
        self.normalise = normalise
        self.num_classes = num_classes

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        image, label, iou = self.samples[index]
        labels = one_hot_labels(torch.from_numpy(label)[None], None, self.num_classes)[0]
        return {"image": self.normalise(image), "labels": labels, "iou": torch.tensor(iou, dtype=torch.float32)}


@dataclass
class EvalNetSetting:
    """What EvalNet needs from the run: where it keeps its files, the run's data and dataset facts, where it
    trains (``accelerator``) and scores (``device``), and (``ldt_predictions``) how to load the generation-0
    students' ``predict_logits``."""

    folder: Path
    datamodule: Any  # the run's SelfTrainingDataModule: labeled images to train on, unlabeled ones to score
    in_channels: int
    num_classes: int
    ignore_index: int
    accelerator: str = "cpu"
    device: torch.device | str = "cpu"
    fast_dev_run: bool = False
    ldt_students: Callable[[], list[Callable[[torch.Tensor], torch.Tensor]]] | None = None
    binary_threshold: float = 0.5
    background_index: int = 0
    seed: int = 0


def evalnet_data(setting: EvalNetSetting, options: Mapping[str, Any]) -> tuple[Dataset, Dataset]:
    """EvalNet's training and validation sets (``options["training_data"]``)."""
    datamodule = setting.datamodule
    if options["training_data"] == "perturbed_truth":

        def perturbed(part: str, samples: int) -> Dataset:
            return PerturbedMasks(datamodule.part_dataset(part), setting.num_classes, setting.ignore_index, samples,
                                  float(options["perturb_prob"]), float(options["empty_iou"]))  # fmt: skip

        return perturbed("labeled", int(options["samples_per_image"])), perturbed("val", int(options["num_loops_val"]))
    if setting.ldt_students is None:
        raise ConfigError("method.evalnet.training_data=ldt_predictions needs the generation-0 students")
    predictors = setting.ldt_students()
    if len(predictors) < int(options["min_models"]):
        raise ConfigError(
            f"method.evalnet.training_data=ldt_predictions draws {options['min_models']}+ generation-0 students a "
            f"sample, but generation 0 has {len(predictors)}; raise method.students_per_generation or use "
            "method.evalnet.training_data=perturbed_truth"
        )
    normalise = datamodule.eval_views._tensor
    rng = np.random.default_rng([setting.seed, 7])
    parts = []
    classes = (setting.num_classes, setting.ignore_index, setting.background_index)
    for part, loops in (("labeled", int(options["num_loops"])), ("val", int(options["num_loops_val"]))):
        images, truths = resized_part(datamodule, part)
        if not images:  # e.g. no validation images: every EvalNet scores a validation MAE of 0
            parts.append(EvalNetSamples([], normalise, setting.num_classes))
            continue
        votes = ldt_votes(predictors, images, normalise, setting.device, setting.binary_threshold)
        samples = [
            ldt_sample(image, truth, votes[:, index], rng, options, *classes)
            for _ in range(loops)
            for index, (image, truth) in enumerate(zip(images, truths, strict=True))
        ]
        parts.append(EvalNetSamples(samples, normalise, setting.num_classes))
    return parts[0], parts[1]


@torch.no_grad()
def mean_absolute_error(net: EvalNet, loader: Iterable[dict[str, torch.Tensor]], device: torch.device | str) -> float:
    """EvalNet's mean absolute error of the predicted IoU on ``loader`` (the official selection metric)."""
    net = net.to(device).eval()
    total, count = 0.0, 0
    for batch in loader:
        predicted = net(batch["image"].to(device), batch["labels"].to(device))
        total += float((predicted - batch["iou"].to(device)).abs().sum())
        count += int(batch["iou"].numel())
    return total / max(count, 1)


def train_evalnets(setting: EvalNetSetting, options: Mapping[str, Any]) -> list[EvalNet]:
    """Train ``num_evalnets`` EvalNets (each from its own initialisation) and return the ``ensemble_size`` with the
    lowest validation MAE; reloads what ``<folder>`` already holds (``model_<i>.pt``, ``evalnet.json``).

    The global random generators (torch, NumPy, Python) leave as they came: each EvalNet seeds its own
    initialisation, and the run's students after it draw the same numbers whether the EvalNets were trained here
    or reloaded by a resumed run."""
    states = rng_states()
    try:
        return _train_evalnets(setting, options)
    finally:
        set_rng_states(states)


def _train_evalnets(setting: EvalNetSetting, options: Mapping[str, Any]) -> list[EvalNet]:
    folder = Path(setting.folder)
    summary_path = folder / "evalnet.json"
    width, lr = float(options["width_multiplier"]), float(options["lr"])
    count = int(options["ensemble_size"]) if setting.fast_dev_run else int(options["num_evalnets"])

    def load(index: int) -> EvalNet:
        net = EvalNet(setting.in_channels, setting.num_classes, width)
        net.load_state_dict(torch.load(folder / f"model_{index}.pt", map_location="cpu"))
        return net.to(setting.device).eval()

    if summary_path.is_file():
        summary = json.loads(summary_path.read_text())
        if "ensemble" in summary:
            return [load(i) for i in summary["ensemble"]]
    train_data, val_data = evalnet_data(setting, options)
    batch_size = int(options["batch_size"])
    datamodule = setting.datamodule
    errors: list[float] = []
    steps = 0
    for index in range(count):
        weights = folder / f"model_{index}.pt"
        if not weights.is_file():
            torch.manual_seed(setting.seed * 1009 + index)  # another initialisation and sample order per EvalNet
            module = EvalNetModule(setting.in_channels, setting.num_classes, width, lr)
            trainer = L.Trainer(
                max_steps=1 if setting.fast_dev_run else int(options["max_steps"]),
                max_epochs=-1,
                accelerator=setting.accelerator,
                devices=1,
                logger=CSVLogger(str(folder), name="csv", version=f"evalnet_{index}"),
                enable_checkpointing=False,
                enable_model_summary=False,
                enable_progress_bar=False,
                log_every_n_steps=10,
                default_root_dir=str(folder),
            )
            trainer.fit(module, train_dataloaders=datamodule._loader(train_data, batch_size, train=True))
            steps = int(trainer.global_step)
            folder.mkdir(parents=True, exist_ok=True)
            atomic_save(module.net.state_dict(), weights)
        errors.append(mean_absolute_error(load(index), datamodule._loader(val_data, batch_size, train=False),
                                          setting.device))  # fmt: skip
    ensemble = sorted(range(count), key=lambda i: errors[i])[: int(options["ensemble_size"])]
    atomic_write_json(summary_path, {"steps": steps, "val_mae": errors, "ensemble": ensemble, **dict(options)})
    log.info("EvalNet validation MAE %s; ensemble %s", [round(e, 4) for e in errors], ensemble)
    return [load(i) for i in ensemble]


def filter_with_evalnet(setting: EvalNetSetting, config: Mapping[str, Any], pseudo: PseudoLabels) -> dict[str, Any]:
    """Score ``pseudo`` with the EvalNet ensemble (options: ``config``, i.e. ``method.evalnet``; the mean of the
    members' scores) and set its ``scores`` and ``copies``; return a summary."""
    options = evalnet_options(config)
    evalnets = train_evalnets(setting, options)
    datamodule = setting.datamodule
    loader: DataLoader = datamodule._loader(
        datamodule.part_dataset("unlabeled", views=datamodule.eval_views, with_masks=False),
        datamodule.batch_size_eval,
        train=False,
    )
    batches = ((list(batch["id"]), batch["image"]) for batch in loader)
    black = None
    if options["training_data"] == "ldt_predictions":
        black = datamodule.eval_views._tensor(np.zeros((1, 1, setting.in_channels), dtype=np.uint8))[:, 0, 0]

    def ensemble(image: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return torch.stack([net(image, labels) for net in evalnets]).mean(dim=0)

    pseudo.scores = score_pseudo_labels(ensemble, batches, pseudo, setting.num_classes, setting.device, black)
    if options["copy_rule"] == "official":
        copies = official_copies(
            pseudo.scores, float(options["min_threshold"]), float(options["max_threshold"]), int(options["max_copies"])
        )
    else:
        copies = copies_from_scores(pseudo.scores, float(options["threshold"]), int(options["max_extra_copies"]))
    pseudo.copies = np.where(pseudo.copies > 0, copies, 0)  # images the keep filter dropped stay dropped
    kept = int((pseudo.copies > 0).sum())
    log.info("EvalNet kept %d of %d pseudo-labels (%s rule)", kept, len(pseudo), options["copy_rule"])
    return {
        "copy_rule": options["copy_rule"],
        "threshold": float(options["threshold"]),
        "ensemble_size": len(evalnets),
        "mean_score": float(np.nanmean(pseudo.scores)) if len(pseudo) else None,
        "kept": kept,
    }
