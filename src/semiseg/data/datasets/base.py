"""The interface of a defect dataset: an index of samples, and loaders for one image and one mask.

A :class:`DefectDataset` only indexes files when it is built (names, pairs, counts; no decoding), so a
large dataset starts fast. Contents are checked when a sample is loaded: the mask must have the image's
size and only values that map to a class. The DataModule turns pools of :class:`Sample` into splits.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from semiseg.errors import DataError, DatasetNotFoundError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")

EMPTY_MASK = -1
"""``Sample.mask`` of a labeled image known to be all background (e.g. DAGM's defect-free images, which
have no mask file): :meth:`DefectDataset.load` returns zeros of the image's size."""


@dataclass(frozen=True)
class Sample:
    """One image of a dataset.

    Attributes:
        id: unique, stable identifier (written to ``split.json``).
        image: path of the image file, or the index of an in-memory image.
        mask: path of the mask file, an in-memory index, :data:`EMPTY_MASK` for an all-background image
            without a mask file, or ``None`` for an image without any mask.
        classes: defect classes present (the stratum of the split); ``None`` if unknown until loaded.
    """

    id: str
    image: Path | int
    mask: Path | int | None
    classes: frozenset[int] | None = None


class DefectDataset(abc.ABC):
    """Base class of every dataset.

    Subclasses set their own attributes, then call ``super().__init__``, which runs :meth:`index` (filling
    the pools); they implement :meth:`load_mask`. The default :meth:`load_image` reads a file with OpenCV in
    the configured number of channels.

    Args:
        name: short name used in messages and ``results.json``.
        class_names: names of all classes, background first; index i is mask value i.
        in_channels: 1 (grayscale) or 3 (RGB).
        ignore_index: mask value of pixels without a label.
    """

    def __init__(self, name: str, class_names: Sequence[str], in_channels: int = 3, ignore_index: int = 255) -> None:
        self.name = name
        self.class_names = list(class_names)
        self.in_channels = in_channels
        self.ignore_index = ignore_index
        self.train_samples: list[Sample] = []
        self.test_samples: list[Sample] | None = None
        self.val_samples: list[Sample] | None = None
        self.extra_unlabeled_samples: list[Sample] = []
        self.index()
        if not self.train_samples:
            root = getattr(self, "root", None)
            where = f" in {root}" if root is not None else ""
            raise DataError(
                f"dataset '{self.name}' has no training images{where}; check the folder (and its splits/train.txt) "
                "or dataset.root"
            )

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @abc.abstractmethod
    def index(self) -> None:
        """Fill ``train_samples``, optionally ``test_samples`` (an official test split), ``val_samples``
        (an official validation split) and ``extra_unlabeled_samples`` (images that never had masks).
        Must not decode images."""

    @abc.abstractmethod
    def load_mask(self, sample: Sample) -> np.ndarray:
        """The class-index mask ``(H, W)`` int64 of ``sample``; values in ``[0, num_classes)`` or
        ``ignore_index``."""

    def load_image(self, sample: Sample) -> np.ndarray:
        """The image ``(H, W, in_channels)`` uint8 of ``sample``."""
        return read_image(Path(sample.image), self.in_channels)

    def load(self, sample: Sample) -> tuple[np.ndarray, np.ndarray | None]:
        """Image ``(H, W, C)`` uint8 and mask ``(H, W)`` int64 (``None`` without mask), checked."""
        image = self.load_image(sample)
        if sample.mask is None:
            return image, None
        if isinstance(sample.mask, int) and sample.mask == EMPTY_MASK:
            return image, np.zeros(image.shape[:2], dtype=np.int64)
        mask = self.load_mask(sample)
        if mask.shape != image.shape[:2]:
            raise DataError(
                f"{sample.mask}: mask is {mask.shape[1]}x{mask.shape[0]} but its image {sample.image} is "
                f"{image.shape[1]}x{image.shape[0]}; masks must have their image's size"
            )
        self.check_mask_values(mask, sample)
        return image, mask

    def check_mask_values(self, mask: np.ndarray, sample: Sample) -> None:
        values = np.unique(mask)
        bad = [int(v) for v in values if not (0 <= v < self.num_classes or v == self.ignore_index)]
        if bad:
            raise DataError(
                f"{sample.mask}: mask values {bad[:10]} are outside the classes 0..{self.num_classes - 1} "
                f"(ignore value {self.ignore_index}); fix the mask or the dataset's class list / mask_values"
            )


class DamagedImageError(DataError):
    """An image file that decodes only in part (a truncated JPEG): OpenCV would fill the rest with grey."""


JPEG_START, JPEG_END = b"\xff\xd8", b"\xff\xd9"
JPEG_TRAILER_BYTES = 4096  # some writers append metadata after the end-of-image marker; look this far back


def jpeg_is_truncated(data: bytes) -> bool:
    """Whether JPEG ``data`` (starting with the start-of-image marker) lacks its end-of-image marker."""
    return data[:2] == JPEG_START and JPEG_END not in data[-JPEG_TRAILER_BYTES:]


def read_image(path: Path, channels: int) -> np.ndarray:
    """Read an image file as ``(H, W, channels)`` uint8 (RGB order for 3 channels).

    Raises:
        DataError: the file is missing or not an image.
        DamagedImageError: a truncated JPEG (the decoder would silently fill the missing part with grey).
    """
    flag = cv2.IMREAD_GRAYSCALE if channels == 1 else cv2.IMREAD_COLOR
    try:
        data = Path(path).read_bytes()
    except OSError:
        data = b""
    if jpeg_is_truncated(data):
        raise DamagedImageError(
            f"{path}: truncated JPEG (no end-of-image marker; the decoder would fill the rest with grey): "
            "replace or remove the file, or skip such images with data.damaged_images=skip"
        )
    image = cv2.imdecode(np.frombuffer(data, np.uint8), flag) if data else None
    if image is None:
        raise DataError(f"{path}: cannot read this image file (missing, empty or not an image)")
    if channels == 1:
        return image[:, :, None]
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def read_mask_file(path: Path) -> np.ndarray:
    """Read a single-channel mask file as ``(H, W)`` array of its stored values."""
    mask = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if mask is None:
        raise DataError(f"{path}: cannot read this mask file (missing, empty or not an image)")
    if mask.ndim == 3:
        mask = mask[:, :, 0]
    return mask


def read_label_mask(path: Path) -> np.ndarray:
    """Read a mask whose stored values are labels, as ``(H, W)`` array of those values.

    Unlike :func:`read_mask_file`, a palette ("P" mode) PNG gives its palette indices, not the colours
    OpenCV would expand them to. Grayscale masks give their values; a colour mask whose three channels
    are equal gives that channel. A colour mask with distinct channels is an error naming the file.
    """
    try:
        with Image.open(path) as handle:
            mode = handle.mode
            mask = np.asarray(handle)
    except (OSError, ValueError) as error:
        raise DataError(f"{path}: cannot read this mask file ({error})") from None
    if mask.ndim == 3:
        if mode in ("RGBA", "LA"):
            mask = mask[:, :, :-1]
        if mask.shape[2] > 1 and not all(np.array_equal(mask[:, :, 0], mask[:, :, c]) for c in range(1, mask.shape[2])):
            raise DataError(
                f"{path}: colour mask ({mode}) with different values per channel; store masks as single-channel "
                "label images (grayscale or palette PNG) whose values are class indices"
            )
        mask = mask[:, :, 0]
    return mask


def require_root(name: str, root: Path, layout: str, source: str) -> None:
    """Raise :class:`DatasetNotFoundError` if ``root`` is missing or holds no files."""
    if not root.is_dir() or not any(root.iterdir()):
        raise DatasetNotFoundError(name, root, layout, source)


def pair_files(images: dict[str, Path], masks: dict[str, Path], where: Path, how: str) -> list[tuple[str, Path, Path]]:
    """Match images and masks by key; an image without a mask or a mask without an image is an error.

    ``how`` tells the user the naming rule (e.g. ``"<stem>.jpg with mask <stem>.png"``).
    """
    missing_masks = sorted(set(images) - set(masks))
    if missing_masks:
        raise DataError(
            f"{images[missing_masks[0]]}: image has no mask ({len(missing_masks)} such images in {where}); "
            f"expected {how}"
        )
    orphan_masks = sorted(set(masks) - set(images))
    if orphan_masks:
        raise DataError(
            f"{masks[orphan_masks[0]]}: mask has no image ({len(orphan_masks)} such masks in {where}); expected {how}"
        )
    return [(key, images[key], masks[key]) for key in sorted(images)]
