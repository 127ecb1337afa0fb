"""Albumentations pipelines built from config, and the views a method asks for.

Every sample is resized to the dataset's ``image_size`` first and normalised with its ``mean``/``std``
last. In between, training samples go through the *weak* pipeline (geometric and mild photometric
changes, applied to image and mask alike). Strong views (``image_strong``, ``image_strong2``) apply the
*strong* photometric pipeline on top of the weakly augmented image, so all views of one unlabeled image
share its geometry and a pseudo-label from the weak view is valid for the strong ones. ``cutmix_box``
views are binary ``(H, W)`` masks of a random box (UniMatch's recipe), drawn per sample.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import albumentations as A
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


class ViewMaker:
    """Turns a raw ``(image, mask)`` into the dict of tensors a batch holds.

    Args:
        image_size: ``[height, width]`` after resizing.
        mean, std: per-channel normalisation (of values scaled to [0, 1]).
        in_channels: image channels.
        weak: weak augmentations (albumentations transforms or their configs); ``None`` for evaluation.
        strong: strong photometric augmentations for ``image_strong*`` views.
        views: keys to produce besides ``mask``: a subset of :data:`KNOWN_VIEWS`, ``image`` always included.
        cutmix: keyword arguments of :func:`cutmix_box` (``prob``, ``area``, ``aspect``).
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
    ) -> None:
        unknown = sorted(set(views) - set(KNOWN_VIEWS))
        if unknown:
            raise ConfigError(f"unknown views {unknown}; a method may ask for {list(KNOWN_VIEWS)}")
        if len(mean) != in_channels or len(std) != in_channels:
            raise ConfigError(
                f"dataset.mean / dataset.std have {len(mean)} / {len(std)} values for in_channels={in_channels}; "
                "give one per channel"
            )
        self.height, self.width = (int(v) for v in image_size)
        self.views = tuple(dict.fromkeys(("image", *views)))
        self.cutmix = dict(cutmix or {})
        weak_transforms = build_transforms(weak, in_channels)
        if self.height != self.width:
            # a 90-degree turn of a 512x256 image is 256x512: it would not batch with the others
            dropped = [type(t).__name__ for t in weak_transforms if isinstance(t, AXIS_SWAPPING)]
            if dropped:
                log.info("image_size %dx%d is not square: leaving out %s", self.height, self.width, dropped)
            weak_transforms = [t for t in weak_transforms if not isinstance(t, AXIS_SWAPPING)]
        self.geometry = A.Compose([A.Resize(self.height, self.width), *weak_transforms])
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
                    sample[view] = torch.from_numpy(cutmix_box(self.height, self.width, self.rng, **self.cutmix))
        if weak_mask is not None:
            sample["mask"] = torch.as_tensor(np.asarray(weak_mask), dtype=torch.int64)
        return sample


Pipeline = Callable[[np.ndarray, np.ndarray | None], dict[str, torch.Tensor]]
