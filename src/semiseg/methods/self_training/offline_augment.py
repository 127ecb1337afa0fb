"""The Inconsistency Masks code's image augmentation, for copies made once (offline) rather than per batch.

The official code (MichaelVorndran/InconsistencyMasks, ``functions.py``) writes augmented copies of the
pseudo-labeled images to disk once per generation and trains on those files without further augmentation:
Noisy Student, IM+, AIM+ replace every pseudo-labeled image by one augmented copy; IM++ / AIM++ write the 1-5
EvalNet copies the same way; EvalNet's own training data and the input ensemble draw the same photometric
noise. Its strength grows by generation (the tables of :data:`OFFICIAL_NOISY_STUDENT`).

One augmentation, as the official ``augment_image_and_mask`` (this is a re-implementation of its
computation):

1. geometry, applied alike to the image and every mask: a vertical flip (probability 1/2, only with
   ``free_rotation``), a horizontal flip (1/2), a rotation by 0/90/180/270° (uniform, only with
   ``free_rotation``; on a non-square image only 0 or 180°, so the copy keeps its shape);
2. brightness/contrast with probability ``brightness_prob`` (1/2): ``|alpha · x + beta|`` saturated to uint8
   (OpenCV's ``convertScaleAbs``), ``alpha`` and ``beta`` uniform in their ranges;
3. blur: ``k`` uniform in ``0..max_blur``; ``k = 1, 2, 3`` blurs with a Gaussian of kernel 3, 5, 7;
4. noise (when ``max_noise > 0``): an integer uniform in ``[-max_noise, max_noise)`` added to every value,
   clipped to 0..255.

The photometric part alone (``photometric``: blur, noise, then brightness, as the official
``data_augmentation_image``) is what the input ensemble applies to each transformed view.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from semiseg.errors import ConfigError

# blur level -> Gaussian kernel size (the official add_noise_and_blur)
BLUR_KERNELS = {1: 3, 2: 5, 3: 7}


@dataclass(frozen=True)
class PhotometricNoise:
    """The strength of one augmentation (the official defaults: ``augment_image_and_mask``'s)."""

    max_blur: int = 3
    max_noise: int = 25
    brightness_alpha: tuple[float, float] = (0.5, 1.5)
    brightness_beta: tuple[float, float] = (-25.0, 25.0)
    brightness_prob: float = 0.5
    free_rotation: bool = True

    def __post_init__(self) -> None:
        if not 0 <= int(self.max_blur) <= max(BLUR_KERNELS):
            raise ConfigError(f"max_blur={self.max_blur} must lie in 0..{max(BLUR_KERNELS)} (kernel 3, 5, 7)")
        if int(self.max_noise) < 0:
            raise ConfigError(f"max_noise={self.max_noise} must be >= 0 (grey levels)")
        for name in ("brightness_alpha", "brightness_beta"):
            low, high = getattr(self, name)
            if not low <= high:
                raise ConfigError(f"{name}={[low, high]} must be [low, high] with low <= high")
        if not 0.0 <= self.brightness_prob <= 1.0:
            raise ConfigError(f"brightness_prob={self.brightness_prob} must lie in [0, 1]")


def _keep_shape(result: np.ndarray, like: np.ndarray) -> np.ndarray:
    """OpenCV drops a trailing channel axis of size 1; put it back."""
    return result.reshape(result.shape[:2] + like.shape[2:])


def blur_and_noise(image: np.ndarray, max_blur: int, max_noise: int, rng: np.random.Generator) -> np.ndarray:
    """``image (H, W[, C])`` uint8 -> blurred (level uniform in ``0..max_blur``) and noised uint8 copy."""
    level = int(rng.integers(0, max_blur + 1))
    if level in BLUR_KERNELS:
        size = BLUR_KERNELS[level]
        image = _keep_shape(cv2.GaussianBlur(image, (size, size), 0), image)
    if max_noise > 0:
        noise = rng.integers(-max_noise, max_noise, size=image.shape)
        image = np.clip(image.astype(np.int16) + noise, 0, 255).astype(np.uint8)
    return image


def brightness(image: np.ndarray, noise: PhotometricNoise, rng: np.random.Generator) -> np.ndarray:
    """With probability ``brightness_prob``: ``saturate(|alpha · image + beta|)``."""
    alpha = float(rng.uniform(*noise.brightness_alpha))
    beta = float(rng.uniform(*noise.brightness_beta))
    if rng.random() < noise.brightness_prob:
        image = _keep_shape(cv2.convertScaleAbs(image, alpha=alpha, beta=beta), image)
    return image


def photometric(image: np.ndarray, noise: PhotometricNoise, rng: np.random.Generator) -> np.ndarray:
    """The official ``data_augmentation_image``: blur and noise, then brightness; ``(H, W[, C])`` uint8."""
    return brightness(blur_and_noise(image, noise.max_blur, noise.max_noise, rng), noise, rng)


def random_geometry(height: int, width: int, free_rotation: bool, rng: np.random.Generator) -> tuple[bool, bool, int]:
    """``(vertical flip, horizontal flip, quarter turns)`` as the official ``augment_image_and_mask`` draws them
    (90° turns only on square images)."""
    vertical = bool(free_rotation and rng.random() < 0.5)
    horizontal = bool(rng.random() < 0.5)
    turns = int(rng.integers(0, 4)) if free_rotation else 0
    if height != width and turns % 2:
        turns = 2  # a quarter turn would change the shape of a non-square copy
    return vertical, horizontal, turns


def apply_geometry(array: np.ndarray, vertical: bool, horizontal: bool, turns: int) -> np.ndarray:
    """Flip ``array (H, W[, C])`` (vertically, then horizontally) and turn it ``turns`` quarters clockwise."""
    if vertical:
        array = array[::-1]
    if horizontal:
        array = array[:, ::-1]
    return np.ascontiguousarray(np.rot90(array, k=-turns, axes=(0, 1)))


def augment_with_masks(
    image: np.ndarray, masks: Sequence[np.ndarray], noise: PhotometricNoise, rng: np.random.Generator
) -> tuple[np.ndarray, list[np.ndarray]]:
    """One offline copy: ``image (H, W[, C])`` uint8 and ``masks`` (each ``(H, W)``) with the same flips and
    turns, then brightness, blur and noise on the image only (the official ``augment_image_and_mask``)."""
    geometry = random_geometry(image.shape[0], image.shape[1], noise.free_rotation, rng)
    image = apply_geometry(image, *geometry)
    moved = [apply_geometry(mask, *geometry) for mask in masks]
    image = brightness(image, noise, rng)
    return blur_and_noise(image, noise.max_blur, noise.max_noise, rng), moved


# Noisy Student / IM+ / IM++ (ISIC 2018, HeLa, SUIM, Cityscapes scripts): index 0 is the first generation
# trained on pseudo-labels (semiseg's generation 1)
OFFICIAL_NOISY_STUDENT: dict[str, list[Any]] = {
    "max_blur": [0, 1, 1, 2, 3],
    "max_noise": [5, 10, 15, 20, 25],
    "brightness_alpha": [[0.9, 1.1], [0.8, 1.2], [0.7, 1.3], [0.6, 1.4], [0.5, 1.5]],
    "brightness_beta": [[-5, 5], [-10, 10], [-15, 15], [-20, 20], [-25, 25]],
}
OFFLINE_COPY_KEYS = (*OFFICIAL_NOISY_STUDENT, "free_rotation")


def offline_copy_noise(tables: Mapping[str, Any], generation: int) -> PhotometricNoise:
    """The :class:`PhotometricNoise` of ``generation`` (>= 1) from per-generation ``tables`` (``method.offline_copy``:
    each of ``max_blur``, ``max_noise``, ``brightness_alpha``, ``brightness_beta`` a list whose entry ``g - 1``
    is generation ``g``'s, the last entry for later generations; ``free_rotation`` one bool)."""
    unknown = sorted(set(tables) - set(OFFLINE_COPY_KEYS))
    if unknown:
        raise ConfigError(f"method.offline_copy has no key(s) {unknown}; it takes {list(OFFLINE_COPY_KEYS)}")
    if generation < 1:
        raise ValueError(f"offline copies are made from generation 1 on, not {generation}")
    values: dict[str, Any] = {}
    for key in OFFICIAL_NOISY_STUDENT:
        table = tables.get(key, OFFICIAL_NOISY_STUDENT[key])
        if not isinstance(table, Sequence) or isinstance(table, str) or not table:
            raise ConfigError(f"method.offline_copy.{key}={table!r} must be a non-empty list (one entry a generation)")
        entry = table[min(generation, len(table)) - 1]
        values[key] = tuple(float(v) for v in entry) if key.startswith("brightness") else int(entry)
    values["free_rotation"] = bool(tables.get("free_rotation", True))
    try:
        return PhotometricNoise(**values)
    except ConfigError as error:
        raise ConfigError(f"method.offline_copy (generation {generation}): {error}") from None
