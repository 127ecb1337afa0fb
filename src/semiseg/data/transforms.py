"""Albumentations pipelines built from config, and the views a method asks for.

Every sample is resized to the dataset's ``image_size`` first and normalised with its ``mean``/``std``
last (the *resize* protocol of the papers). With ``crop_size`` (native-resolution patches), training samples
are instead scaled by ``scale`` (1: the image's own resolution), padded where smaller than the crop (masks with
the ignore value) and cropped at random; a labeled crop is centred on a random defect pixel with probability
``defect_crop_prob``. Evaluation views with ``native=True`` are only scaled, so whole images reach the sliding
window (:mod:`semiseg.inference`) at their own size. In between, training samples go through the *weak*
pipeline (geometric and mild photometric changes, applied to image and mask alike). Strong views
(``image_strong``, ``image_strong2``) apply the *strong* photometric pipeline on top of the weakly augmented
image, so all views of one unlabeled image share its geometry (and its crop) and a pseudo-label from the weak
view is valid for the strong ones. ``cutmix_box`` views are binary ``(H, W)`` masks of a random box
(UniMatch's recipe), drawn per sample.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import albumentations as A
import cv2
import numpy as np
import torch
from albumentations.pytorch import ToTensorV2
from hydra.utils import instantiate

from semiseg.errors import ConfigError

log = logging.getLogger(__name__)

IMAGE_VIEWS = ("image", "image_strong", "image_strong2")
# Transforms that swap height and width: only valid for square outputs.
AXIS_SWAPPING = (A.RandomRotate90, A.Transpose)
BOX_VIEWS = ("cutmix_box", "cutmix_box2")
KNOWN_VIEWS = IMAGE_VIEWS + BOX_VIEWS


def build_transforms(specs: Sequence[Any] | None, in_channels: int) -> list[A.BasicTransform]:
    """Instantiate a list of albumentations transform configs (each with ``_target_``)."""
    transforms = []
    for spec in specs or []:
        transform = instantiate(spec) if not isinstance(spec, A.BasicTransform) else spec
        if in_channels == 1 and isinstance(transform, A.ToGray):
            continue  # already gray: ToGray would only warn
        transforms.append(transform)
    return transforms


def seed_pipeline(pipeline: A.Compose, seed: int) -> None:
    """Seed a Compose and each of its transforms with distinct seeds derived from ``seed``.

    (albumentations 2.0's ``Compose.set_random_seed`` gives every transform the same seed, which makes,
    e.g., a horizontal and a vertical flip always fire together.)
    """
    seeds = np.random.SeedSequence(seed).generate_state(len(pipeline.transforms) + 1, dtype=np.uint64)
    pipeline.set_random_seed(int(seeds[0] % 2**32))
    for transform, child_seed in zip(pipeline.transforms, seeds[1:], strict=True):
        transform.set_random_seed(int(child_seed % 2**32))


def cutmix_box(
    height: int,
    width: int,
    rng: np.random.Generator,
    prob: float = 0.5,
    area: Sequence[float] = (0.02, 0.4),
    aspect: Sequence[float] = (0.3, 1 / 0.3),
) -> np.ndarray:
    """A binary ``(H, W)`` int64 mask holding one random box with probability ``prob``, else all zeros.

    The box covers a share of the image drawn from ``area`` with an aspect ratio drawn from ``aspect``.
    """
    box = np.zeros((height, width), dtype=np.int64)
    if rng.random() > prob:
        return box
    for _ in range(100):
        size = rng.uniform(*area) * height * width
        ratio = rng.uniform(*aspect)
        box_w, box_h = int(np.sqrt(size / ratio)), int(np.sqrt(size * ratio))
        if 0 < box_w <= width and 0 < box_h <= height:
            x, y = rng.integers(0, width - box_w + 1), rng.integers(0, height - box_h + 1)
            box[y : y + box_h, x : x + box_w] = 1
            return box
    return box


class DefectCentredCrop(A.CropNonEmptyMaskIfExists):
    """A ``height x width`` crop centred on a random defect pixel of the mask (moved inside the image at its
    borders); a uniformly random crop when the mask has no defect pixel. ``ignore_values`` (background, ignore
    value) are not defects. Same arguments as albumentations' ``CropNonEmptyMaskIfExists``, which only
    guarantees that the pixel lies somewhere in the crop."""

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        mask = self._preprocess_mask(data["mask"])
        mask_height, mask_width = mask.shape[:2]
        defects = np.argwhere(mask.reshape(mask_height, mask_width) if mask.ndim == 2 else mask.any(axis=-1))
        if len(defects):
            y, x = defects[self.py_random.randrange(len(defects))]
            x_min = int(np.clip(x - self.width // 2, 0, mask_width - self.width))
            y_min = int(np.clip(y - self.height // 2, 0, mask_height - self.height))
        else:
            x_min = self.py_random.randint(0, mask_width - self.width)
            y_min = self.py_random.randint(0, mask_height - self.height)
        return {"crop_coords": (x_min, y_min, x_min + self.width, y_min + self.height)}


def scale_transforms(scale: float) -> list[A.BasicTransform]:
    """``[]`` for ``scale == 1``, else a deterministic resize by the factor (masks nearest-neighbour)."""
    if not scale > 0:
        raise ConfigError(f"dataset.scale={scale!r} must be a positive factor, e.g. dataset.scale=0.5")
    if scale == 1:
        return []
    return [A.RandomScale(scale_limit=(scale - 1, scale - 1), interpolation=cv2.INTER_AREA, p=1.0)]


def crop_transforms(
    crop_size: Sequence[int], defect_crop_prob: float, ignore_index: int, background_index: int, with_mask: bool
) -> list[A.BasicTransform]:
    """Pad to at least ``crop_size`` (image 0, mask ``ignore_index``) and crop ``crop_size`` at random; with a
    mask, the crop is centred on a defect pixel with probability ``defect_crop_prob``."""
    height, width = (int(side) for side in crop_size)
    if not 0 <= defect_crop_prob <= 1:
        raise ConfigError(f"data.defect_crop_prob={defect_crop_prob!r} must lie in [0, 1], e.g. 0.5")
    pad = A.PadIfNeeded(
        min_height=height, min_width=width, border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=ignore_index
    )
    random_crop = A.RandomCrop(height, width)
    if not with_mask or defect_crop_prob == 0:
        return [pad, random_crop]
    centred = DefectCentredCrop(height, width, ignore_values=[background_index, ignore_index])
    if defect_crop_prob == 1:
        return [pad, centred]
    centred.p, random_crop.p = defect_crop_prob, 1 - defect_crop_prob
    return [pad, A.OneOf([centred, random_crop], p=1.0)]


class ViewMaker:
    """Turns a raw ``(image, mask)`` into the dict of tensors a batch holds.

    Args:
        image_size: ``[height, width]`` after resizing (the resize protocol).
        mean, std: per-channel normalisation (of values scaled to [0, 1]).
        in_channels: image channels.
        weak: weak augmentations (albumentations transforms or their configs); ``None`` for evaluation.
        strong: strong photometric augmentations for ``image_strong*`` views.
        views: keys to produce besides ``mask``: a subset of :data:`KNOWN_VIEWS`, ``image`` always included.
        cutmix: keyword arguments of :func:`cutmix_box` (``prob``, ``area``, ``aspect``).
        crop_size: ``[height, width]`` of random crops at native resolution (after ``scale``) instead of resizing.
        scale: resize factor before cropping (with ``crop_size`` or ``native``); 1 keeps the image's resolution.
        defect_crop_prob: with ``crop_size`` and a mask: probability of centring the crop on a defect pixel.
        native: evaluation views of whole images: only ``scale``, no resize (for the sliding window).
        ignore_index, background_index: the mask's ignore value (padding) and background class (not a defect).
    """

    def __init__(
        self,
        image_size: Sequence[int],
        mean: Sequence[float],
        std: Sequence[float],
        in_channels: int,
        weak: Sequence[Any] | None = None,
        strong: Sequence[Any] | None = None,
        views: Sequence[str] = ("image",),
        cutmix: dict | None = None,
        crop_size: Sequence[int] | None = None,
        scale: float = 1.0,
        defect_crop_prob: float = 0.0,
        native: bool = False,
        ignore_index: int = 255,
        background_index: int = 0,
    ) -> None:
        unknown = sorted(set(views) - set(KNOWN_VIEWS))
        if unknown:
            raise ConfigError(f"unknown views {unknown}; a method may ask for {list(KNOWN_VIEWS)}")
        if len(mean) != in_channels or len(std) != in_channels:
            raise ConfigError(
                f"dataset.mean / dataset.std have {len(mean)} / {len(std)} values for in_channels={in_channels}; "
                "give one per channel"
            )
        if crop_size is not None and (len(crop_size) != 2 or min(crop_size) < 1):
            raise ConfigError(
                f"data.crop_size={list(crop_size)} must be [height, width], e.g. data.crop_size=[128,128]"
            )
        self.height, self.width = (int(v) for v in (crop_size if crop_size is not None else image_size))
        self.native = bool(native)
        self.views = tuple(dict.fromkeys(("image", *views)))
        self.cutmix = dict(cutmix or {})
        weak_transforms = build_transforms(weak, in_channels)
        if self.native:
            sizing = scale_transforms(scale)  # whole images at their own (scaled) size
        elif crop_size is not None:
            with_mask = defect_crop_prob > 0
            sizing = [
                *scale_transforms(scale),
                *crop_transforms(crop_size, defect_crop_prob, ignore_index, background_index, with_mask),
            ]
        else:
            sizing = [A.Resize(self.height, self.width)]
        if self.height != self.width:
            # a 90-degree turn of a 512x256 image is 256x512: it would not batch with the others
            dropped = [type(t).__name__ for t in weak_transforms if isinstance(t, AXIS_SWAPPING)]
            if dropped:
                log.info("image_size %dx%d is not square: leaving out %s", self.height, self.width, dropped)
            weak_transforms = [t for t in weak_transforms if not isinstance(t, AXIS_SWAPPING)]
        self.geometry = A.Compose([*sizing, *weak_transforms])
        self.strong = A.Compose(build_transforms(strong, in_channels))
        self.finish = A.Compose([A.Normalize(mean=list(mean), std=list(std)), ToTensorV2()])
        self._seeded_with: int | None = None
        self.rng = np.random.default_rng(0)

    def _seed_once(self) -> None:
        """Seed all random draws from torch's seed of this process or DataLoader worker.

        Lightning's ``seed_everything(workers=True)`` gives every worker its own torch seed derived from
        the run's ``seed``, so augmentations are reproducible and differ between workers.
        """
        seed = int(torch.initial_seed()) % 2**63
        if seed == self._seeded_with:
            return
        self._seeded_with = seed
        for offset, pipeline in enumerate((self.geometry, self.strong)):
            seed_pipeline(pipeline, seed + offset)
        self.rng = np.random.default_rng(seed + 2)

    def _tensor(self, image: np.ndarray) -> torch.Tensor:
        return self.finish(image=image)["image"]

    def __call__(self, image: np.ndarray, mask: np.ndarray | None) -> dict[str, torch.Tensor]:
        """``image (H0, W0, C)`` uint8, ``mask (H0, W0)`` or ``None`` -> dict of ``(C, H, W)`` float
        images, ``(H, W)`` int64 ``mask`` (when given) and ``(H, W)`` int64 boxes."""
        self._seed_once()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            if mask is not None:
                out = self.geometry(image=image, mask=mask)
                weak_image, weak_mask = out["image"], out["mask"]
            else:
                weak_image, weak_mask = self.geometry(image=image)["image"], None
            sample: dict[str, torch.Tensor] = {}
            for view in self.views:
                if view == "image":
                    sample[view] = self._tensor(weak_image)
                elif view in IMAGE_VIEWS:
                    sample[view] = self._tensor(self.strong(image=weak_image)["image"])
                else:
                    height, width = weak_image.shape[:2]
                    sample[view] = torch.from_numpy(cutmix_box(height, width, self.rng, **self.cutmix))
        if weak_mask is not None:
            sample["mask"] = torch.as_tensor(np.asarray(weak_mask), dtype=torch.int64)
        return sample


Pipeline = Callable[[np.ndarray, np.ndarray | None], dict[str, torch.Tensor]]
