"""The Magnetic Tile surface-defect dataset (Huang et al., "Surface defect saliency of magnetic tile",
The Visual Computer 2020), in its original layout::

    MTiles_data/MT_<Class>/Imgs/<stem>.jpg   grayscale image (sizes vary)
    MTiles_data/MT_<Class>/Imgs/<stem>.png   its mask: 0 background, 255 defect, anti-aliased edges

The mask does not carry the defect's class: it comes from the folder name. Mask pixels at or above
``mask_threshold`` (128) take the folder's class index, the others are background. There is no official
test split; the DataModule carves a seeded, stratified ``test_fraction``. ``MT_Free`` (defect-free) is
left out by default, as in the UAPS protocol; ``defective_only: false`` adds it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from semiseg.data.datasets.base import (
    DefectDataset,
    Sample,
    pair_files,
    read_mask_file,
    require_root,
)
from semiseg.errors import ConfigError

SOURCE = "https://github.com/abin24/Magnetic-tile-defect-datasets. (clone it; keep the MT_<Class> folders)"
LAYOUT = "MTiles_data/MT_<Class>/Imgs/<stem>.jpg with mask <stem>.png"
FREE_CLASS = "Free"


class MagneticTiles(DefectDataset):
    """Magnetic Tiles.

    Args:
        root: the ``MTiles_data`` folder.
        class_names: background first, then the defect folders' class names (``MT_<name>``).
        defective_only: leave out ``MT_Free`` (UAPS protocol).
        mask_threshold: mask values at or above this are defect.
    """

    def __init__(
        self,
        root: str | Path,
        class_names: Sequence[str] = ("background", "Blowhole", "Break", "Crack", "Fray", "Uneven"),
        defective_only: bool = True,
        mask_threshold: int = 128,
        in_channels: int = 3,
        ignore_index: int = 255,
        name: str = "mtiles",
    ) -> None:
        self.root = Path(root)
        self.defective_only = defective_only
        self.mask_threshold = mask_threshold
        super().__init__(name, class_names, in_channels, ignore_index)

    def index(self) -> None:
        require_root(self.name, self.root, LAYOUT, SOURCE)
        folders = [(c, i) for i, c in enumerate(self.class_names) if i > 0]
        if not self.defective_only:
            folders.append((FREE_CLASS, 0))
        samples = []
        for class_name, class_index in folders:
            folder = self.root / f"MT_{class_name}" / "Imgs"
            if not folder.is_dir():
                raise ConfigError(
                    f"{folder}: class folder missing; dataset.class_names={list(self.class_names)} expects "
                    f"one MT_<name>/Imgs folder per defect class under {self.root} ({LAYOUT})"
                )
            images = {p.stem: p for p in folder.iterdir() if p.suffix.lower() == ".jpg"}
            masks = {p.stem: p for p in folder.iterdir() if p.suffix.lower() == ".png"}
            pairs = pair_files(images, masks, folder, "<stem>.jpg with its mask <stem>.png")
            classes = frozenset([class_index]) if class_index > 0 else frozenset()
            samples += [
                Sample(id=f"{class_name}/{stem}", image=image, mask=mask, classes=classes)
                for stem, image, mask in pairs
            ]
        self.train_samples = samples

    def load_mask(self, sample: Sample) -> np.ndarray:
        raw = read_mask_file(Path(sample.mask))
        class_index = self.class_names.index(sample.id.split("/")[0]) if sample.classes else 0
        return np.where(raw >= self.mask_threshold, class_index, 0).astype(np.int64)
