"""Partial pixel labels: generating them from full masks, and the store of (grown) labels.

Partially labeled masks hold the dataset's ``ignore_index`` on every pixel without a label. They come from
one of two places, chosen by the ``partial_labels`` config group:

* ``given``: the dataset's masks are already partial and load as they are;
* ``points`` / ``scribble`` / ``erode``: full masks are turned into partial ones, deterministically from
  ``(partial_labels.seed, image id)``, to simulate a cheap annotation and measure against the full truth:

  - ``points``: ``points_per_region`` random pixels of every connected region of every class, the
    connected background areas included;
  - ``scribble``: the one-pixel skeleton of every defect region, thickened to ``width`` pixels;
  - ``erode``: every defect region shrunk by ``radius`` pixels (a region that would vanish keeps its
    innermost pixel).

  In every mode a random ``background_share`` of the background pixels is kept as well, and every defect
  region keeps at least one labeled pixel. A conversion only ever removes labels.

``none`` (the default) leaves the DataModule as it is: full masks, no store.

Masks are resized to the training ``image_size`` (nearest neighbour) *before* the conversion, so that no
point is lost by resizing. The :class:`LabelStore` keeps, per labeled image at that size, the given
(partial) labels, the current labels (which ``cps_rg`` grows) and, for generated partial labels, the full
mask (only to measure the grown labels' precision; it never reaches training). The current labels live in
shared memory, so DataLoader workers, persistent ones included, always read the latest labels.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import torch
from skimage.morphology import skeletonize
from torch.utils.data import Dataset

from semiseg.data.datasets.base import DefectDataset, Sample
from semiseg.data.transforms import ViewMaker
from semiseg.errors import ConfigError, DataError, check_choice

log = logging.getLogger(__name__)

PARTIAL_MODES = ("none", "given", "points", "scribble", "erode")
GENERATED_MODES = ("points", "scribble", "erode")
BACKGROUND = 0


@dataclass(frozen=True)
class PartialLabels:
    """The ``partial_labels`` config: how the labeled images' masks become partial.

    Attributes:
        mode: one of :data:`PARTIAL_MODES`.
        seed: with the image id, fixes which pixels are kept.
        points_per_region: ``points``: pixels kept per connected region (background areas included).
        width: ``scribble``: stroke width in pixels.
        radius: ``erode``: pixels removed from the border of every defect region.
        background_share: share of the background pixels kept at random, in every mode.
    """

    mode: str = "none"
    seed: int = 0
    points_per_region: int = 5
    width: int = 1
    radius: int = 3
    background_share: float = 0.0

    def __post_init__(self) -> None:
        check_choice("partial_labels.mode", self.mode, PARTIAL_MODES)
        if not 0.0 <= self.background_share <= 1.0:
            raise ConfigError(f"partial_labels.background_share={self.background_share} must lie in [0, 1]")
        for key in ("points_per_region", "width"):
            if getattr(self, key) < 1:
                raise ConfigError(f"partial_labels.{key}={getattr(self, key)} must be at least 1")
        if self.radius < 0:
            raise ConfigError(f"partial_labels.radius={self.radius} must be non-negative")

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | None) -> PartialLabels:
        config = dict(config or {})
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(config) - known)
        if unknown:
            raise ConfigError(f"partial_labels has no key(s) {unknown}; known keys: {sorted(known)}")
        return cls(**config)

    @property
    def active(self) -> bool:
        """Whether the labeled images' masks go through a :class:`LabelStore`."""
        return self.mode != "none"

    @property
    def generated(self) -> bool:
        """Whether partial labels are made from full masks (so the full truth is known)."""
        return self.mode in GENERATED_MODES


def sample_rng(seed: int, sample_id: str) -> np.random.Generator:
    """A generator fixed by ``(seed, sample_id)``, the same on every machine and in every process."""
    return np.random.default_rng([seed, zlib.crc32(sample_id.encode("utf-8"))])


def _regions(binary: np.ndarray) -> tuple[int, np.ndarray]:
    count, labels = cv2.connectedComponents(binary.astype(np.uint8), connectivity=8)
    return count, labels


def make_partial_mask(
    mask: np.ndarray, spec: PartialLabels, rng: np.random.Generator, ignore_index: int = 255
) -> np.ndarray:
    """Full mask ``(H, W)`` -> partial mask ``(H, W)`` (same dtype) following ``spec``.

    Kept pixels keep their class; all others become ``ignore_index``. Pixels already equal to
    ``ignore_index`` stay ignored, so the result only ever removes labels.
    """
    keep = np.zeros(mask.shape, dtype=bool)
    classes = [int(c) for c in np.unique(mask) if c != ignore_index]
    for cls in classes:
        binary = mask == cls
        if spec.mode == "points":
            count, regions = _regions(binary)
            for region in range(1, count):
                ys, xs = np.nonzero(regions == region)
                chosen = rng.choice(len(ys), size=min(spec.points_per_region, len(ys)), replace=False)
                keep[ys[chosen], xs[chosen]] = True
        elif cls == BACKGROUND:
            continue  # scribbles and erosion concern defects; background comes from background_share
        elif spec.mode == "scribble":
            stroke = skeletonize(binary)
            if spec.width > 1:
                kernel = np.ones((spec.width, spec.width), np.uint8)
                stroke = cv2.dilate(stroke.astype(np.uint8), kernel).astype(bool) & binary
            keep |= stroke
        elif spec.mode == "erode":
            keep |= _erode_keeping_every_region(binary, spec.radius)
    if spec.background_share > 0:
        keep |= (mask == BACKGROUND) & (rng.random(mask.shape) < spec.background_share)
    partial = np.full_like(mask, ignore_index)
    partial[keep] = mask[keep]
    return partial


def _erode_keeping_every_region(binary: np.ndarray, radius: int) -> np.ndarray:
    """``binary`` eroded by ``radius`` (pixels within ``radius`` of its border removed, distance > radius
    kept); a region that would vanish keeps its innermost pixel."""
    padded = np.pad(binary.astype(np.uint8), 1)  # the image border is not a region border
    distance = cv2.distanceTransform(padded, cv2.DIST_L2, 5)[1:-1, 1:-1]
    eroded = distance > radius
    count, regions = _regions(binary)
    for region in range(1, count):
        inside = regions == region
        if not (eroded & inside).any():
            flat = np.where(inside, distance, -1.0).argmax()
            eroded.flat[flat] = True
    return eroded


def _label_dtype(num_classes: int, ignore_index: int) -> torch.dtype:
    return torch.uint8 if max(num_classes - 1, ignore_index) <= 255 else torch.int16


class LabelStore:
    """The current labels of the labeled images, at the training size, kept where workers can read them.

    Tensors (``N`` labeled images, ``H x W`` the dataset's ``image_size``):

    * ``given (N, H, W)``: the partial labels as annotated or generated; never overwritten;
    * ``current (N, H, W)``: given plus grown labels (in shared memory when ``share_memory``);
    * ``full (N, H, W)`` or ``None``: the full masks, for generated partial labels only (diagnostics).

    Args:
        dataset: loads the masks.
        samples: the labeled samples, in a fixed order (index ``i`` of the tensors is ``samples[i]``).
        image_size: ``[height, width]`` of the stored masks.
        spec: how masks become partial.
        share_memory: move ``current`` to shared memory (needed with DataLoader workers).
    """

    def __init__(
        self,
        dataset: DefectDataset,
        samples: Sequence[Sample],
        image_size: Sequence[int],
        spec: PartialLabels,
        share_memory: bool = True,
    ) -> None:
        self.dataset = dataset
        self.samples = list(samples)
        self.ids = [s.id for s in self.samples]
        self.index = {sample_id: i for i, sample_id in enumerate(self.ids)}
        self.height, self.width = (int(v) for v in image_size)
        self.spec = spec
        self.ignore_index = dataset.ignore_index
        self.num_classes = dataset.num_classes
        self.share_memory = share_memory
        self.dtype = _label_dtype(self.num_classes, self.ignore_index)
        shape = (len(self.samples), self.height, self.width)
        self.given = torch.full(shape, self.ignore_index, dtype=self.dtype)
        self.current = torch.full(shape, self.ignore_index, dtype=self.dtype)
        self.full: torch.Tensor | None = (
            torch.full(shape, self.ignore_index, dtype=self.dtype) if spec.generated else None
        )
        self.grown_epochs: list[int] = []
        self.history: list[dict[str, Any]] = []
        self.filled = False

    def __len__(self) -> int:
        return len(self.samples)

    def fill(self) -> None:
        """Load, resize and (for generated modes) convert every labeled mask; runs once."""
        if self.filled:
            return
        for i, sample in enumerate(self.samples):
            if sample.mask is None:
                raise DataError(f"{sample.id}: a labeled image has no mask; partial labels need one per image")
            mask = self.dataset.load_mask(sample)
            self.dataset.check_mask_values(mask, sample)
            mask = cv2.resize(mask.astype(np.int32), (self.width, self.height), interpolation=cv2.INTER_NEAREST)
            if self.full is not None:
                self.full[i] = torch.from_numpy(mask).to(self.dtype)
            if self.spec.generated:
                mask = make_partial_mask(mask, self.spec, sample_rng(self.spec.seed, sample.id), self.ignore_index)
            self.given[i] = torch.from_numpy(mask).to(self.dtype)
        self.current.copy_(self.given)
        if self.share_memory:
            self.current.share_memory_()
        self.filled = True
        log.info("label store: %d images, labeled share %.4f", len(self), self.labeled_share()["all"])

    def mask(self, index: int) -> np.ndarray:
        """The current labels of image ``index`` as ``(H, W)`` int64."""
        self.fill()
        return self.current[index].numpy().astype(np.int64)

    def update(self, indices: torch.Tensor | Sequence[int], labels: torch.Tensor) -> int:
        """Set the current labels of images ``indices`` to ``labels (B, H, W)``, except where labels were given.

        Returns the number of pixels whose label changed.
        """
        self.fill()
        indices = torch.as_tensor(indices, dtype=torch.long)
        given = self.given[indices]
        labels = torch.where(given != self.ignore_index, given, labels.to(self.dtype))
        changed = int((self.current[indices] != labels).sum())
        self.current[indices] = labels  # in place: workers see the new labels
        return changed

    # ---- statistics ---------------------------------------------------------------------------------
    def labeled_share(self, labels: torch.Tensor | None = None) -> dict[str, float]:
        """Share of all stored pixels labeled with each class (by name) and in total (``all``)."""
        labels = self.current if labels is None else labels
        total = max(labels.numel(), 1)
        counts = torch.bincount(labels.flatten().long(), minlength=max(self.num_classes, self.ignore_index + 1))
        shares = {name: float(counts[c]) / total for c, name in enumerate(self.dataset.class_names)}
        shares["all"] = float(counts[: self.num_classes].sum()) / total
        return shares

    def grown_precision(self) -> dict[str, float | None]:
        """Precision of the grown labels (current minus given) against the full masks, per class and overall.

        ``None`` where nothing was grown or the full truth is unknown. A diagnostic only.
        """
        if self.full is None:
            return {}
        grown = (self.given == self.ignore_index) & (self.current != self.ignore_index)
        correct = grown & (self.current == self.full)
        result: dict[str, float | None] = {}
        for c, name in enumerate(self.dataset.class_names):
            of_class = grown & (self.current == c)
            count = int(of_class.sum())
            result[name] = float((correct & of_class).sum()) / count if count else None
        count = int(grown.sum())
        result["all"] = float(correct.sum()) / count if count else None
        return result

    # ---- checkpoints --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        self.fill()
        return {
            "ids": list(self.ids),
            "current": self.current.clone(),
            "grown_epochs": list(self.grown_epochs),
            "history": list(self.history),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.fill()
        if list(state["ids"]) != self.ids:
            raise DataError(
                "the checkpoint's grown labels belong to other labeled images than this run's split; "
                "resume with the run's split.json (split_file=...) and the same dataset"
            )
        current = torch.as_tensor(state["current"]).to(self.dtype)
        if current.shape != self.current.shape:
            raise DataError(
                f"the checkpoint's grown labels are {tuple(current.shape[1:])} but dataset.image_size is "
                f"{[self.height, self.width]}; resume with the same image_size"
            )
        self.current.copy_(torch.where(self.given != self.ignore_index, self.given, current))
        self.grown_epochs = list(state.get("grown_epochs", []))
        self.history = list(state.get("history", []))


class StoreDataset(Dataset):
    """The labeled images with their current labels from a :class:`LabelStore`.

    Images are resized to the store's size before ``views`` run, so image and stored mask match.
    Each item also carries ``index``, the image's row in the store.
    """

    def __init__(self, store: LabelStore, views: ViewMaker, with_masks: bool = True) -> None:
        self.store = store
        self.views = views
        self.with_masks = with_masks

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.store.samples[index]
        image = self.store.dataset.load_image(sample)
        if image.shape[:2] != (self.store.height, self.store.width):
            image = cv2.resize(image, (self.store.width, self.store.height), interpolation=cv2.INTER_LINEAR)
            if image.ndim == 2:
                image = image[:, :, None]
        mask = self.store.mask(index) if self.with_masks else None
        item: dict[str, Any] = self.views(image, mask)
        item["id"] = sample.id
        item["index"] = index
        return item
