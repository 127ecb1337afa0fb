"""Your own data: a folder of images and masks, optionally unlabeled images and fixed splits::

    <root>/images/<name>.<ext>        any common image format (png, jpg, bmp, tif); subfolders allowed
    <root>/masks/<name>.<ext>         one mask per image, same relative name (any extension)
    <root>/unlabeled/<name>.<ext>     optional: images without masks, always in the unlabeled part
    <root>/splits/train.txt           optional: one name per line (extension optional); likewise
    <root>/splits/val.txt                       val.txt and test.txt. Names in no list are left out
    <root>/splits/test.txt                      when train.txt exists, else they form the train pool.

Masks are single-channel label images (grayscale or palette PNG). ``mask_values`` maps stored values to
class indices, as ``[[stored, class], ...]`` pairs (a list replaces cleanly on the command line) or a dict
(e.g. ``[[0, 0], [255, 1]]`` or ``{0: 0, 255: 1}`` for black/white masks); without it the stored values are
the class indices. A stored value that the mapping does not name is an error naming the file and the values,
except ``ignore_index``, which stays unlabeled. Without ``test.txt`` the DataModule carves a seeded
``test_fraction``; without ``val.txt`` a ``val_fraction``. The classes of each image are read from its
mask once and cached (:mod:`semiseg.data.datasets.index_cache`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from semiseg.data.datasets.base import (
    IMAGE_SUFFIXES,
    DefectDataset,
    Sample,
    pair_files,
    read_label_mask,
    require_root,
)
from semiseg.data.datasets.index_cache import MaskIndex, scan_mask
from semiseg.errors import ConfigError, DataError

log = logging.getLogger(__name__)

SOURCE = "your own images (set dataset.root=/path/to/folder, see docs/datasets.md)"
LAYOUT = "<root>/images/<name>.<ext> with masks <root>/masks/<name>.<ext>, optional unlabeled/ and splits/"
UNLABELED_PREFIX = "unlabeled/"


def index_images(folder: Path) -> dict[str, Path]:
    """Image files under ``folder`` by relative name without extension; two files of one name is an error."""
    found: dict[str, Path] = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith("."):
            key = path.relative_to(folder).with_suffix("").as_posix()
            if key in found:
                raise DataError(f"{path}: two files named '{key}' ({found[key].name}, {path.name}); keep one")
            found[key] = path
    return found


def read_list(path: Path) -> list[str]:
    """Names in a split file: one per line, extension optional, blank lines and ``#`` comments skipped."""
    names = []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name = Path(line)
            names.append((name.with_suffix("") if name.suffix.lower() in IMAGE_SUFFIXES else name).as_posix())
    return names


class ImageFolder(DefectDataset):
    """A user's folder of images and masks.

    Args:
        root: the folder holding ``images/`` and ``masks/``.
        class_names: names of all classes, background first; index i is class i.
        mask_values: stored mask value -> class index, as a dict or ``[[stored, class], ...]`` pairs
            (``None``: stored values are class indices).
        in_channels: 1 (grayscale) or 3 (RGB).
        ignore_index: class index of unlabeled pixels (a stored value equal to it stays unlabeled).
        cache_dir: where the mask index is cached (``None``: no cache).
    """

    def __init__(
        self,
        root: str | Path,
        class_names: Sequence[str] = ("background", "defect"),
        mask_values: Mapping[int, int] | Sequence[Sequence[int]] | None = None,
        in_channels: int = 3,
        ignore_index: int = 255,
        cache_dir: str | Path | None = None,
        name: str = "folder",
    ) -> None:
        self.root = Path(root)
        self.mask_values = self._check_mapping(mask_values, len(class_names), ignore_index)
        self.lookup = self._lookup_table(self.mask_values, ignore_index)
        self.mask_index = MaskIndex(
            cache_dir,
            name,
            {"root": str(self.root.resolve()), "classes": list(class_names), "values": self.mask_values},
        )
        super().__init__(name, class_names, in_channels, ignore_index)

    @staticmethod
    def _check_mapping(
        mask_values: Mapping[int, int] | Sequence[Sequence[int]] | None, num_classes: int, ignore_index: int
    ) -> dict[int, int] | None:
        if mask_values is None:
            return None
        try:
            pairs = mask_values.items() if isinstance(mask_values, Mapping) else mask_values
            mapping = {int(k): int(v) for k, v in pairs}
        except (TypeError, ValueError):
            raise ConfigError(
                f"dataset.mask_values={mask_values!r} must map stored values to class indices: pairs "
                "[[stored, class], ...] such as [[0, 0], [255, 1]], or null"
            ) from None
        bad = {k: v for k, v in mapping.items() if not (0 <= v < num_classes or v == ignore_index)}
        if bad or any(not 0 <= k < 65536 for k in mapping):
            raise ConfigError(
                f"dataset.mask_values={mapping}: stored values must be 0..65535 and classes 0..{num_classes - 1} "
                f"(or ignore {ignore_index}); fix the mapping or dataset.class_names"
            )
        return mapping

    @staticmethod
    def _lookup_table(mapping: dict[int, int] | None, ignore_index: int) -> np.ndarray | None:
        """A 65536-entry table stored value -> class (-1 for values the mapping does not name)."""
        if mapping is None:
            return None
        table = np.full(65536, -1, dtype=np.int64)
        table[ignore_index] = ignore_index
        for stored, class_index in mapping.items():
            table[stored] = class_index
        return table

    def index(self) -> None:
        require_root(self.name, self.root, LAYOUT, SOURCE)
        image_dir, mask_dir = self.root / "images", self.root / "masks"
        for folder in (image_dir, mask_dir):
            if not folder.is_dir():
                raise DataError(f"{folder}: folder missing; expected {LAYOUT}")
        pairs = pair_files(
            index_images(image_dir), index_images(mask_dir), self.root, "images/<name> with masks/<name>"
        )
        labeled = {key: Sample(key, image, mask) for key, image, mask in pairs}
        pools = self._apply_split_files(labeled)
        self.train_samples = self.mask_index.with_classes(pools["train"], lambda s: scan_mask(self, s))
        if pools.get("val") is not None:
            self.val_samples = self.mask_index.with_classes(pools["val"], lambda s: scan_mask(self, s))
        if pools.get("test") is not None:
            self.test_samples = self.mask_index.with_classes(pools["test"], lambda s: scan_mask(self, s))
        unlabeled_dir = self.root / "unlabeled"
        if unlabeled_dir.is_dir():
            self.extra_unlabeled_samples = [
                Sample(f"{UNLABELED_PREFIX}{key}", path, None) for key, path in index_images(unlabeled_dir).items()
            ]

    def _apply_split_files(self, labeled: dict[str, Sample]) -> dict[str, list[Sample] | None]:
        split_dir = self.root / "splits"
        lists = {part: split_dir / f"{part}.txt" for part in ("train", "val", "test")}
        given = {part: read_list(path) for part, path in lists.items() if path.is_file()}
        owner: dict[str, str] = {}
        for part, names in given.items():
            for name in names:
                if name not in labeled:
                    raise DataError(f"{lists[part]}: '{name}' is not an image with a mask in {self.root / 'images'}")
                if name in owner and owner[name] != part:
                    raise DataError(f"{lists[part]}: '{name}' is also listed in {lists[owner[name]]}; keep it in one")
                owner[name] = part
        pools: dict[str, list[Sample] | None] = {
            part: [labeled[n] for n in dict.fromkeys(names)] for part, names in given.items()
        }
        if "train" not in given:
            pools["train"] = [sample for key, sample in labeled.items() if key not in owner]
        else:
            left_out = len(labeled) - len(owner)
            if left_out:
                log.warning("%d labeled images are in no list of %s and are not used", left_out, split_dir)
        return pools

    def load_mask(self, sample: Sample) -> np.ndarray:
        raw = read_label_mask(Path(sample.mask))
        if self.lookup is None:
            return raw.astype(np.int64)
        mapped = self.lookup[raw.astype(np.int64).clip(0, 65535)]
        if (mapped < 0).any():
            unknown = sorted({int(v) for v in np.unique(raw[mapped < 0])})
            raise DataError(
                f"{sample.mask}: mask values {unknown[:10]} are not in dataset.mask_values={self.mask_values}; "
                "add them to the mapping (stored value: class index)"
            )
        return mapped
