"""A procedurally generated surface-inspection dataset that needs no download.

Each image is a textured surface (brushed metal, granular casting or woven fabric) under uneven
illumination, with zero to three defects drawn from four classes:

=========  ==========================================================================  ==============
class      what it looks like                                                          share of draws
=========  ==========================================================================  ==============
scratch    a thin, long, nearly straight stroke, brighter or darker than the surface   0.22
spot       a small dark blowhole with a faint bright rim                               0.30
crack      a thin dark jagged path that wanders and sometimes branches                 0.13
patch      a large, irregular, low-contrast region whose texture is smoothed out       0.35
=========  ==========================================================================  ==============

About one image in five is defect-free. Scratches and cracks differ only by shape, patches only by
contrast and texture, so the task is learnable but not trivial. Everything is deterministic in
``(seed, image index)``: image ``i`` is the same whatever the number of images, and the defect classes
of every image are known before it is rendered (so the split can be stratified without rendering).
Images are rendered on first use and cached in memory.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from semiseg.data.datasets.base import DefectDataset, Sample
from semiseg.errors import ConfigError

DEFAULT_CLASS_NAMES = ("background", "scratch", "spot", "crack", "patch")
DEFAULT_CLASS_FREQUENCIES = (0.22, 0.30, 0.13, 0.35)
DEFECT_COUNT_PROBABILITIES = (0.55, 0.30, 0.15)  # one, two, three defects on a defective image
REFERENCE_SIZE = 128.0  # defect sizes below are given for a 128-pixel image and scale with it


class SyntheticDefects(DefectDataset):
    """The built-in synthetic defect set.

    Args:
        num_images: images in the whole set (train and test pools together).
        image_size: ``[height, width]`` of the rendered images.
        seed: generator seed; the same seed gives the same images on every machine.
        defect_free_fraction: probability that an image has no defect.
        class_frequencies: relative frequency of scratch, spot, crack, patch among drawn defects.
        class_names: background first, then the four defect classes.
        in_channels: 3 (tinted RGB) or 1 (grayscale).
    """

    def __init__(
        self,
        num_images: int = 600,
        image_size: Sequence[int] = (128, 128),
        seed: int = 0,
        defect_free_fraction: float = 0.2,
        class_frequencies: Sequence[float] = DEFAULT_CLASS_FREQUENCIES,
        class_names: Sequence[str] = DEFAULT_CLASS_NAMES,
        in_channels: int = 3,
        ignore_index: int = 255,
        name: str = "synthetic",
    ) -> None:
        if num_images < 2:
            raise ConfigError(f"dataset.num_images={num_images}: the synthetic set needs at least 2 images")
        if len(class_names) != len(DEFAULT_CLASS_NAMES):
            raise ConfigError(
                f"dataset.class_names has {len(class_names)} names; the synthetic set draws exactly "
                f"{len(DEFAULT_CLASS_NAMES)} classes {list(DEFAULT_CLASS_NAMES)}"
            )
        if len(class_frequencies) != len(DEFAULT_CLASS_FREQUENCIES) or min(class_frequencies) < 0:
            raise ConfigError(
                f"dataset.class_frequencies={list(class_frequencies)}: give 4 non-negative numbers "
                "(scratch, spot, crack, patch)"
            )
        if not 0.0 <= defect_free_fraction < 1.0:
            raise ConfigError(f"dataset.defect_free_fraction={defect_free_fraction} must lie in [0, 1)")
        self.num_images = num_images
        self.height, self.width = (int(v) for v in image_size)
        self.seed = seed
        self.defect_free_fraction = defect_free_fraction
        frequencies = np.asarray(class_frequencies, dtype=float)
        self.class_frequencies = frequencies / frequencies.sum()
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        super().__init__(name, class_names, in_channels, ignore_index)

    @property
    def generated_size(self) -> tuple[int, int]:
        """``(width, height)`` every image is drawn at (before any resize of the pipeline)."""
        return self.width, self.height

    def index(self) -> None:
        self.train_samples = [
            Sample(id=f"synthetic_{i:05d}", image=i, mask=i, classes=frozenset(self.plan(i)))
            for i in range(self.num_images)
        ]

    def plan(self, index: int) -> list[int]:
        """The defect classes (1..4) drawn on image ``index``, in drawing order."""
        rng = np.random.default_rng([self.seed, index, 0])
        if rng.random() < self.defect_free_fraction:
            return []
        count = 1 + int(rng.choice(len(DEFECT_COUNT_PROBABILITIES), p=DEFECT_COUNT_PROBABILITIES))
        return [1 + int(c) for c in rng.choice(4, size=count, p=self.class_frequencies)]

    def load(self, sample: Sample) -> tuple[np.ndarray, np.ndarray | None]:
        index = int(sample.image)
        if index not in self._cache:
            self._cache[index] = self.render(index)
        image, mask = self._cache[index]
        return image, (mask if sample.mask is not None else None)

    def load_image(self, sample: Sample) -> np.ndarray:
        return self.load(sample)[0]

    def load_mask(self, sample: Sample) -> np.ndarray:
        return self.load(sample)[1]

    def render(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Image ``(H, W, in_channels)`` uint8 and mask ``(H, W)`` int64 of image ``index``."""
        rng = np.random.default_rng([self.seed, index, 1])
        surface = _surface(rng, self.height, self.width)
        mask = np.zeros((self.height, self.width), dtype=np.int64)
        scale = min(self.height, self.width) / REFERENCE_SIZE
        for defect_class in self.plan(index):
            draw = _DEFECT_PAINTERS[defect_class]
            region = draw(rng, surface, scale)
            mask[region] = defect_class
        surface += rng.normal(0.0, rng.uniform(0.012, 0.03), surface.shape)
        if self.in_channels == 3:
            tint = rng.uniform(0.88, 1.12, size=3)
            image = surface[:, :, None] * tint[None, None, :]
        else:
            image = surface[:, :, None]
        image = np.clip(image * 255.0, 0, 255).astype(np.uint8)
        return image, mask


def _smooth_noise(rng: np.random.Generator, height: int, width: int, cells: int) -> np.ndarray:
    """Smooth random field in [-1, 1] with about ``cells`` bumps per side."""
    grid = rng.uniform(-1.0, 1.0, size=(cells + 1, cells + 1)).astype(np.float32)
    return cv2.resize(grid, (width, height), interpolation=cv2.INTER_CUBIC).astype(np.float64)


def _surface(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A defect-free textured surface ``(H, W)`` float in about [0, 1]."""
    base = rng.uniform(0.35, 0.65)
    illumination = rng.uniform(0.04, 0.12) * _smooth_noise(rng, height, width, 3)
    ys, xs = np.mgrid[0:height, 0:width] / max(height, width)
    gradient = rng.uniform(-0.08, 0.08) * xs + rng.uniform(-0.08, 0.08) * ys
    noise = rng.normal(0.0, 1.0, (height, width)).astype(np.float32)
    kind = rng.integers(3)
    if kind == 0:  # brushed metal: grain along one axis
        sigma_along, sigma_across = rng.uniform(4.0, 9.0), rng.uniform(0.4, 0.8)
        if rng.random() < 0.5:
            texture = cv2.GaussianBlur(noise, (0, 0), sigmaX=sigma_along, sigmaY=sigma_across)
        else:
            texture = cv2.GaussianBlur(noise, (0, 0), sigmaX=sigma_across, sigmaY=sigma_along)
    elif kind == 1:  # granular casting
        texture = cv2.GaussianBlur(noise, (0, 0), sigmaX=rng.uniform(0.8, 1.6))
    else:  # woven fabric: a periodic weave plus fibre noise
        period_x, period_y = rng.uniform(5.0, 10.0, size=2)
        yy, xx = np.mgrid[0:height, 0:width]
        weave = np.sin(2 * np.pi * xx / period_x) * np.sin(2 * np.pi * yy / period_y)
        texture = weave + 0.6 * cv2.GaussianBlur(noise, (0, 0), sigmaX=0.8)
    texture = texture / (np.std(texture) + 1e-8)
    return base + illumination + gradient + rng.uniform(0.03, 0.07) * texture


def _stroke_region(canvas_shape: tuple[int, int], points: np.ndarray, thickness: int) -> np.ndarray:
    canvas = np.zeros(canvas_shape, dtype=np.uint8)
    cv2.polylines(canvas, [points.astype(np.int32).reshape(-1, 1, 2)], False, 1, thickness, cv2.LINE_8)
    return canvas.astype(bool)


def _apply(surface: np.ndarray, region: np.ndarray, delta: float, blur: float = 0.7) -> None:
    """Add ``delta`` on ``region`` with slightly blurred edges, in place."""
    soft = cv2.GaussianBlur(region.astype(np.float32), (0, 0), sigmaX=blur)
    surface += delta * np.maximum(soft, region.astype(np.float32))


def _scratch(rng: np.random.Generator, surface: np.ndarray, scale: float) -> np.ndarray:
    height, width = surface.shape
    length = rng.uniform(0.35, 0.85) * min(height, width)
    angle = rng.uniform(0, np.pi)
    center = rng.uniform([0.2 * width, 0.2 * height], [0.8 * width, 0.8 * height])
    direction = np.array([np.cos(angle), np.sin(angle)])
    normal = np.array([-direction[1], direction[0]])
    bend = rng.uniform(-0.04, 0.04) * length
    t = np.linspace(-0.5, 0.5, 12)[:, None]
    points = center + t * length * direction + (1 - 4 * t**2) * bend * normal
    region = _stroke_region(surface.shape, points, max(1, round(rng.uniform(2.0, 3.5) * scale)))
    _apply(surface, region, rng.choice([-1.0, 1.0]) * rng.uniform(0.2, 0.35))
    return region


def _spot(rng: np.random.Generator, surface: np.ndarray, scale: float) -> np.ndarray:
    height, width = surface.shape
    axes = (rng.uniform(2.5, 7.0, size=2) * scale).astype(int) + 1
    center = (int(rng.uniform(0.1, 0.9) * width), int(rng.uniform(0.1, 0.9) * height))
    angle = float(rng.uniform(0, 180))
    core = np.zeros(surface.shape, dtype=np.uint8)
    cv2.ellipse(core, center, (int(axes[0]), int(axes[1])), angle, 0, 360, 1, -1)
    rim = np.zeros(surface.shape, dtype=np.uint8)
    cv2.ellipse(rim, center, (int(axes[0]) + 1, int(axes[1]) + 1), angle, 0, 360, 1, max(1, int(scale)))
    _apply(surface, rim.astype(bool), rng.uniform(0.04, 0.1), blur=0.5)
    _apply(surface, core.astype(bool), -rng.uniform(0.22, 0.4), blur=1.0)
    return (core | rim).astype(bool)


def _crack(rng: np.random.Generator, surface: np.ndarray, scale: float) -> np.ndarray:
    height, width = surface.shape
    region = np.zeros(surface.shape, dtype=bool)
    thickness = max(1, round(rng.uniform(1.5, 2.5) * scale))
    start = rng.uniform([0.15 * width, 0.15 * height], [0.85 * width, 0.85 * height])
    heading = rng.uniform(0, 2 * np.pi)
    branches = [(start, heading, int(rng.integers(25, 55)))]
    while branches:
        point, heading, steps = branches.pop()
        points = [point]
        for _ in range(steps):
            heading += rng.normal(0.0, 0.45)
            point = point + 2.0 * scale * np.array([np.cos(heading), np.sin(heading)])
            points.append(point)
            if rng.random() < 0.04 and len(branches) < 2:
                branches.append((point, heading + rng.choice([-1.0, 1.0]) * rng.uniform(0.5, 1.2), steps // 3))
        region |= _stroke_region(surface.shape, np.asarray(points), thickness)
    _apply(surface, region, -rng.uniform(0.25, 0.4))
    return region


def _patch(rng: np.random.Generator, surface: np.ndarray, scale: float) -> np.ndarray:
    height, width = surface.shape
    radius = rng.uniform(10.0, 28.0) * scale
    center = rng.uniform([0.15 * width, 0.15 * height], [0.85 * width, 0.85 * height])
    yy, xx = np.mgrid[0:height, 0:width]
    distance = np.hypot((xx - center[0]) / radius, (yy - center[1]) / (radius * rng.uniform(0.6, 1.4)))
    wobble = 0.35 * _smooth_noise(rng, height, width, 6)
    region = distance + wobble < 1.0
    if not region.any():
        region[int(center[1]) % height, int(center[0]) % width] = True
    smoothed = cv2.GaussianBlur(surface.astype(np.float32), (0, 0), sigmaX=3.0).astype(np.float64)
    surface[region] = smoothed[region]
    _apply(surface, region, rng.choice([-1.0, 1.0]) * rng.uniform(0.12, 0.25), blur=1.5)
    return region


_DEFECT_PAINTERS = {1: _scratch, 2: _spot, 3: _crack, 4: _patch}
