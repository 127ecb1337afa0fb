"""KolektorSDD2 (Božič, Tabernik, Skočaj, "Mixed supervision for surface-defect detection: from weakly to
fully supervised learning", Computers in Industry 2021), in its official layout::

    KoSDD2_data/train/<id>.png      colour image, about 230 px wide and 630 px high
    KoSDD2_data/train/<id>_GT.png   its mask: non-zero = defect
    KoSDD2_data/test/...            alike

Two classes (background, defect); any mask pixel at or above ``mask_threshold`` (1: any non-zero pixel)
is defect. The UAPS code divides the mask by 255 and truncates, so only 255 counts there: set
``mask_threshold: 255`` for that variant. Most images are defect-free; whether an image holds a defect is
read from its mask once and cached, so the stratified split keeps positives in every part.

Orientation: the images are portrait strips (height > width). ``image_size: [512, 256]`` in
``conf/dataset/kosdd2.yaml`` is ``[height, width]`` — the UAPS code's ``A.Resize(512, 256)`` — so images
are resized without any rotation.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from semiseg.data.datasets.base import DefectDataset, Sample, pair_files, require_root
from semiseg.data.datasets.index_cache import MaskIndex, scan_mask
from semiseg.errors import ConfigError, DataError

SOURCE = "https://www.vicos.si/resources/kolektorsdd2/ (python -m semiseg.data.download kosdd2)"
LAYOUT = "KoSDD2_data/{train,test}/<id>.png with masks <id>_GT.png in the same folder"
GT_SUFFIX = "_GT"


class KolektorSDD2(DefectDataset):
    """KolektorSDD2 with its official train / test split.

    Args:
        root: the ``KoSDD2_data`` folder.
        class_names: ``[background, defect]``.
        mask_threshold: mask values at or above this are defect (1: any non-zero pixel).
        in_channels: 3 (colour) or 1.
        ignore_index: mask value of unlabeled pixels (unused by this dataset's masks).
        cache_dir: where the mask index is cached (``None``: no cache).
    """

    def __init__(
        self,
        root: str | Path,
        class_names: Sequence[str] = ("background", "defect"),
        mask_threshold: int = 1,
        in_channels: int = 3,
        ignore_index: int = 255,
        cache_dir: str | Path | None = None,
        name: str = "kosdd2",
    ) -> None:
        if len(class_names) != 2:
            raise ConfigError(
                f"dataset.class_names={list(class_names)}: KolektorSDD2 has two classes, e.g. [background, defect]"
            )
        if not 1 <= mask_threshold <= 255:
            raise ConfigError(f"dataset.source.mask_threshold={mask_threshold} must lie in [1, 255]")
        self.root = Path(root)
        self.mask_threshold = mask_threshold
        self.mask_index = MaskIndex(cache_dir, name, {"root": str(self.root.resolve()), "threshold": mask_threshold})
        super().__init__(name, class_names, in_channels, ignore_index)

    def index(self) -> None:
        require_root(self.name, self.root, LAYOUT, SOURCE)
        pools = {}
        for split in ("train", "test"):
            folder = self.root / split
            if not folder.is_dir():
                raise DataError(f"{folder}: folder missing; KolektorSDD2 needs {LAYOUT}")
            files = [p for p in folder.iterdir() if p.suffix.lower() == ".png"]
            masks = {p.stem[: -len(GT_SUFFIX)]: p for p in files if p.stem.endswith(GT_SUFFIX)}
            images = {p.stem: p for p in files if not p.stem.endswith(GT_SUFFIX)}
            pairs = pair_files(images, masks, folder, "<id>.png with its mask <id>_GT.png")
            samples = [Sample(f"{split}/{stem}", image, mask) for stem, image, mask in pairs]
            pools[split] = self.mask_index.with_classes(samples, lambda s: scan_mask(self, s))
        self.train_samples = pools["train"]
        self.test_samples = pools["test"]

    def load_mask(self, sample: Sample) -> np.ndarray:
        raw = cv2.imread(str(sample.mask), cv2.IMREAD_UNCHANGED)
        if raw is None:
            raise DataError(f"{sample.mask}: cannot read this mask file (missing, empty or not an image)")
        if raw.ndim == 3:
            raw = raw.max(axis=2)  # a colour GT: defect where any channel is set
        return (raw >= self.mask_threshold).astype(np.int64)
