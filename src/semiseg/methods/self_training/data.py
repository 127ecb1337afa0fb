"""The training set of a self-training student: labeled images (and their augmented copies) plus the
generation's pseudo-labeled images, served by the suite's one DataModule as its ``labeled`` stream.

A pseudo-labeled item looks like a labeled one, ``{"image" (C, H, W), "mask" (H, W), "im" (H, W) bool,
"id"}``: ``mask`` holds the pseudo-label, with the inconsistency-masked pixels set to ``ignore_index``
(excluded from the loss, the paper), to the background index (``im_handling: background``, the official
code's encoding) or to an extra class index (``im_handling: class``), and those pixels are blacked out in the
input image after augmentation. Labeled items
carry an all-False ``im``.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import torch
from lightning.pytorch.utilities import CombinedLoader
from torch.utils.data import Dataset

from semiseg.data.datamodule import SemiSupervisedDataModule
from semiseg.data.datasets.base import DefectDataset, Sample
from semiseg.data.transforms import ViewMaker
from semiseg.errors import ConfigError, check_choice
from semiseg.methods.self_training.offline_augment import PhotometricNoise, augment_with_masks
from semiseg.methods.self_training.pseudo_label_store import PseudoLabels

MASKED_INPUT_MODES = ("black", "zero")


class MaskedViewMaker(ViewMaker):
    """A :class:`ViewMaker` that also carries an inconsistency mask through the augmentation and blanks the
    masked pixels of the augmented image.

    Args:
        masked_input: ``black`` sets masked pixels to 0 in the raw image before normalisation (the paper's
            black pixels), ``zero`` sets them to 0 in the normalised network input.
        (the other arguments are :class:`ViewMaker`'s)
    """

    def __init__(self, *args: Any, masked_input: str = "black", **kwargs: Any) -> None:
        check_choice("method.masked_input", masked_input, MASKED_INPUT_MODES)
        super().__init__(*args, **kwargs)
        self.masked_input = masked_input

    def make(
        self, image: np.ndarray, mask: np.ndarray, im: np.ndarray, strong: bool = False
    ) -> dict[str, torch.Tensor]:
        """``image (H0, W0, C)`` uint8, ``mask (H0, W0)`` int, ``im (H0, W0)`` bool -> ``{"image" (C, H, W),
        "mask" (H, W) int64, "im" (H, W) bool}``; ``strong`` adds the strong photometric pipeline."""
        self._seed_once()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            out = self.geometry(image=image, masks=[mask, im.astype(np.uint8)])
            picture, (label, blocked) = out["image"], out["masks"]
            if strong:
                picture = self.strong(image=picture)["image"]
        blocked = np.asarray(blocked).astype(bool)
        if self.masked_input == "black":
            picture = picture.copy()
            picture[blocked] = 0
        tensor = self._tensor(picture)
        im_tensor = torch.from_numpy(blocked)
        if self.masked_input == "zero":
            tensor[:, im_tensor] = 0.0
        return {"image": tensor, "mask": torch.as_tensor(np.asarray(label), dtype=torch.int64), "im": im_tensor}


@dataclass(frozen=True)
class Entry:
    """One item of the training set: a sample, the row of its pseudo-label (``None``: ground truth) and
    which copy it is (0: the original, >0: an augmented copy)."""

    sample: Sample
    pseudo_row: int | None
    copy: int


class SelfTrainingSet(Dataset):
    """Labeled images (each ``1 + labeled_copies`` times) and pseudo-labeled ones (each ``copies[i]`` times).

    Args:
        dataset: loads the files.
        labeled: the labeled samples.
        views: the :class:`MaskedViewMaker` of training.
        labeled_copies: augmented copies of every labeled image (ALDT: 9); copies get the strong pipeline.
        pseudo: the generation's pseudo-labels (``None`` in generation 0).
        unlabeled: the unlabeled samples by id.
        im_value: the target value of inconsistency-masked pixels (``ignore_index`` or the IM class).
        strong_probability: probability that a pseudo-labeled item gets the strong pipeline (Noisy Student).
        image_size: ``[H, W]`` of the pseudo-labels.
        offline_noise: when set (Noisy Student, IM+, IM++ as the official code), every pseudo-labeled item is an
            offline augmented copy (:func:`augment_with_masks` of the image, pseudo-label and mask), the same
            copy in every epoch (drawn from ``offline_seed``, ``generation``, the row and the copy number), and
            gets no strong pipeline; the weak (geometric) pipeline still applies, as to every item.
        generation, offline_seed: key the offline copies (another generation or run seed: other copies).
    """

    def __init__(
        self,
        dataset: DefectDataset,
        labeled: Sequence[Sample],
        views: MaskedViewMaker,
        labeled_copies: int = 0,
        pseudo: PseudoLabels | None = None,
        unlabeled: dict[str, Sample] | None = None,
        im_value: int = 255,
        strong_probability: float = 0.0,
        image_size: Sequence[int] = (128, 128),
        offline_noise: PhotometricNoise | None = None,
        generation: int = 0,
        offline_seed: int = 0,
    ) -> None:
        self.dataset = dataset
        self.offline_noise = offline_noise
        self.generation = int(generation)
        self.offline_seed = int(offline_seed)
        self.views = views
        self.pseudo = pseudo
        self.im_value = im_value
        self.strong_probability = strong_probability
        self.height, self.width = (int(v) for v in image_size)
        self.entries = [Entry(s, None, c) for s in labeled for c in range(1 + labeled_copies)]
        if pseudo is not None:
            unlabeled = unlabeled or {}
            for row, sample_id in enumerate(pseudo.ids):
                self.entries += [Entry(unlabeled[sample_id], row, c) for c in range(int(pseudo.copies[row]))]
        self.rng = np.random.default_rng(0)
        self._seeded_with: int | None = None

    def __len__(self) -> int:
        return len(self.entries)

    def _draw(self) -> float:
        seed = int(torch.initial_seed()) % 2**63
        if seed != self._seeded_with:
            self._seeded_with, self.rng = seed, np.random.default_rng(seed + 3)
        return float(self.rng.random())

    def __getitem__(self, index: int) -> dict[str, Any]:
        entry = self.entries[index]
        if entry.pseudo_row is None:
            image, mask = self.dataset.load(entry.sample)
            assert mask is not None, f"labeled sample {entry.sample.id} has no mask"
            im = np.zeros(mask.shape, dtype=bool)
            strong = entry.copy > 0
        else:
            assert self.pseudo is not None
            image = self.dataset.load_image(entry.sample)
            if image.shape[:2] != (self.height, self.width):
                image = cv2.resize(image, (self.width, self.height), interpolation=cv2.INTER_LINEAR)
                if image.ndim == 2:
                    image = image[:, :, None]
            im = self.pseudo.masks[entry.pseudo_row].astype(bool)
            mask = self.pseudo.labels[entry.pseudo_row].astype(np.int64)
            if self.offline_noise is not None:
                image, im, mask = self.offline_copy(image, im, mask, entry)
                strong = False
            else:
                strong = entry.copy > 0 or (self.strong_probability > 0 and self._draw() < self.strong_probability)
            mask = np.where(im, self.im_value, mask)
        item: dict[str, Any] = self.views.make(image, mask, im, strong=strong)
        item["id"] = entry.sample.id
        return item

    def offline_copy(
        self, image: np.ndarray, im: np.ndarray, label: np.ndarray, entry: Entry
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The fixed augmented copy of a pseudo-labeled entry: ``image (H, W, C)`` uint8, ``im (H, W)`` bool,
        ``label (H, W)`` -> the same, moved alike."""
        assert self.offline_noise is not None and entry.pseudo_row is not None
        rng = np.random.default_rng([self.offline_seed, self.generation, entry.pseudo_row, entry.copy])
        image, (label, blocked) = augment_with_masks(image, [label, im.astype(np.uint8)], self.offline_noise, rng)
        return image, blocked.astype(bool), label


class SelfTrainingDataModule(SemiSupervisedDataModule):
    """The suite's DataModule whose ``labeled`` stream is a :class:`SelfTrainingSet`.

    Args:
        labeled_copies: augmented copies of every labeled image (0; ALDT/AIM: 9).
        masked_input: how masked pixels are blanked (see :class:`MaskedViewMaker`).
        (the other arguments are :class:`SemiSupervisedDataModule`'s)
    """

    def __init__(self, labeled_copies: int = 0, masked_input: str = "black", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not isinstance(labeled_copies, int) or labeled_copies < 0:
            raise ConfigError(f"method.labeled_copies={labeled_copies!r} must be a non-negative integer")
        self.labeled_copies = labeled_copies
        views = self.labeled_views
        augmentation = kwargs.get("augmentation") or {}
        self.training_views = MaskedViewMaker(
            image_size=(views.height, views.width),
            mean=kwargs["mean"],
            std=kwargs["std"],
            in_channels=self.dataset.in_channels,
            weak=augmentation.get("weak"),
            strong=augmentation.get("strong"),
            masked_input=masked_input,
        )
        self.image_size = (views.height, views.width)
        self.mean, self.std = list(kwargs["mean"]), list(kwargs["std"])
        self.pseudo: PseudoLabels | None = None
        self.im_value = self.dataset.ignore_index
        self.strong_probability = 0.0
        self.offline_noise: PhotometricNoise | None = None
        self.generation = 0
        self.offline_seed = 0

    def set_pseudo_labels(
        self,
        pseudo: PseudoLabels | None,
        im_value: int | None = None,
        strong_probability: float = 0.0,
        offline_noise: PhotometricNoise | None = None,
        generation: int = 0,
        offline_seed: int = 0,
    ) -> None:
        """Use these pseudo-labels for the next fits (``None``: labeled data only); ``offline_noise``: serve
        every pseudo-labeled item as an offline augmented copy (see :class:`SelfTrainingSet`)."""
        self.pseudo = pseudo
        self.im_value = self.dataset.ignore_index if im_value is None else im_value
        self.strong_probability = strong_probability
        self.offline_noise = offline_noise
        self.generation = generation
        self.offline_seed = offline_seed

    def denormalise(self, image: torch.Tensor) -> np.ndarray:
        """An evaluation batch ``(B, C, H, W)`` back to the uint8 images ``(B, H, W, C)`` it was made from."""
        mean = torch.tensor(self.mean, dtype=image.dtype)[None, :, None, None]
        std = torch.tensor(self.std, dtype=image.dtype)[None, :, None, None]
        raw = ((image.cpu() * std + mean) * 255.0).round().clamp(0, 255)
        return raw.to(torch.uint8).permute(0, 2, 3, 1).numpy()

    def training_set(self) -> SelfTrainingSet:
        return SelfTrainingSet(
            self.dataset,
            self.parts["labeled"],
            self.training_views,
            labeled_copies=self.labeled_copies,
            pseudo=self.pseudo,
            unlabeled={s.id: s for s in self.parts["unlabeled"]},
            im_value=self.im_value,
            strong_probability=self.strong_probability,
            image_size=self.image_size,
            offline_noise=self.offline_noise,
            generation=self.generation,
            offline_seed=self.offline_seed,
        )

    def train_dataloader(self) -> CombinedLoader:
        loaders = {"labeled": self._loader(self.training_set(), self.batch_size_labeled, train=True)}
        if self.use_unlabeled:
            loaders["unlabeled"] = self._loader(self.part_dataset("unlabeled"), self.batch_size_unlabeled, train=True)
        return CombinedLoader(loaders, mode="max_size_cycle")
