"""NEU-Seg, the pixel-level release of the NEU steel-strip surface defects (Dong, Song et al., "PGA-Net:
Pyramid feature fusion and global context attention network for automated surface defect detection",
IEEE Transactions on Industrial Informatics 2020), in its official layout::

    NEU_data/images/training/<id>.jpg        200x200 image (stored as RGB)
    NEU_data/annotations/training/<id>.png   class-index mask: 0 background, 1 inclusion, 2 patches, 3 scratches
    NEU_data/images/test/<id>.jpg            and annotations/test/<id>.png alike

One image may hold several classes. The official training (3630 images) and test (840) splits are
kept: ``test`` is the test pool, validation is a stratified ``val_fraction`` of ``training``. The classes
of each image are read from its mask once and cached (:mod:`semiseg.data.datasets.index_cache`).
"""

from __future__ import annotations

from collections.abc import Sequence
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
from semiseg.errors import DataError

SOURCE = (
    "the NEU-Seg release of the PGA-Net authors (Dong, Song et al., IEEE TII 2020), distributed by K. Song's "
    "group at Northeastern University through a cloud-drive link (see docs/datasets.md; "
    "python -m semiseg.data.download neu prints where to put it)"
)
LAYOUT = "NEU_data/images/{training,test}/<id>.jpg with masks NEU_data/annotations/{training,test}/<id>.png"
SPLITS = {"training": "train", "test": "test"}


class NEUSeg(DefectDataset):
    """NEU-Seg with its official training / test split.

    Args:
        root: the ``NEU_data`` folder.
        class_names: background first, then the classes of mask values 1, 2, 3.
        in_channels: 3 (the images are stored as RGB; their three channels are equal) or 1.
        ignore_index: mask value of unlabeled pixels.
        cache_dir: where the mask index is cached (``None``: no cache).
    """

    def __init__(
        self,
        root: str | Path,
        class_names: Sequence[str] = ("background", "inclusion", "patches", "scratches"),
        in_channels: int = 3,
        ignore_index: int = 255,
        cache_dir: str | Path | None = None,
        name: str = "neu",
    ) -> None:
        self.root = Path(root)
        self.mask_index = MaskIndex(
            cache_dir, name, {"root": str(self.root.resolve()), "classes": list(class_names), "ignore": ignore_index}
        )
        super().__init__(name, class_names, in_channels, ignore_index)

    def index(self) -> None:
        require_root(self.name, self.root, LAYOUT, SOURCE)
        pools = {}
        for folder_name in SPLITS:
            image_dir = self.root / "images" / folder_name
            mask_dir = self.root / "annotations" / folder_name
            for folder in (image_dir, mask_dir):
                if not folder.is_dir():
                    raise DataError(f"{folder}: folder missing; NEU-Seg needs {LAYOUT}")
            images = {p.stem: p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES}
            masks = {p.stem: p for p in mask_dir.iterdir() if p.suffix.lower() == ".png"}
            pairs = pair_files(
                images, masks, image_dir, f"images/{folder_name}/<id>.jpg with annotations/{folder_name}/<id>.png"
            )
            samples = [Sample(f"{folder_name}/{stem}", image, mask) for stem, image, mask in pairs]
            pools[folder_name] = self.mask_index.with_classes(samples, lambda s: scan_mask(self, s))
        self.train_samples = pools["training"]
        self.test_samples = pools["test"]

    def load_mask(self, sample: Sample) -> np.ndarray:
        return read_label_mask(Path(sample.mask)).astype(np.int64)
