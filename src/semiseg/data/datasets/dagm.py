"""DAGM 2007 ("Weakly supervised learning for industrial optical inspection", the DAGM/GNNS competition
2007, Heidelberg Collaboratory for Image Processing), in its official layout::

    DAGM_data/Class<k>/Train/<id>.PNG                    512x512 grayscale image
    DAGM_data/Class<k>/Train/Label/<id>_label.PNG        mask of a defective image (0 / 255 ellipse)
    DAGM_data/Class<k>/Train/Label/Labels.txt            the index (below)
    DAGM_data/Class<k>/Test/...                          alike

``Labels.txt`` starts with a line ``1``, then one tab-separated row per image::

    <row number>  <defective 0/1>  <image file>  0  <mask file, or 0 for a defect-free image>

``classes`` selects texture classes; a defect of ``Class<k>`` gets the label ``classes.index(k) + 1``
(the UAPS setting: Class1..6, 7 labels with background), or 1 with ``binary: true``. Mask pixels at or
above ``mask_threshold`` are defect. ``defective_only: true`` (UAPS) keeps only the images with a defect;
``false`` adds the defect-free ones as all-background images. The official Train / Test folders are the
train and test pools (the UAPS code instead carved a random 20% test split out of Train:
``official_test: false`` leaves the Test folders out, so the DataModule carves ``dataset.test_fraction``
of the Train folders, as ``experiment=uaps_dagm_official`` does).
Everything needed for the split comes from ``Labels.txt``: no image or mask is decoded at start-up.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from semiseg.data.datasets.base import EMPTY_MASK, DefectDataset, Sample, read_mask_file, require_root
from semiseg.errors import ConfigError, DataError

SOURCE = (
    "https://hci.iwr.uni-heidelberg.de/content/weakly-supervised-learning-industrial-optical-inspection "
    "(one archive per Class<k>; unpack each into DAGM_data)"
)
LAYOUT = "DAGM_data/Class<k>/{Train,Test}/<id>.PNG with masks Label/<id>_label.PNG listed in Label/Labels.txt"
LABELS_FILE = Path("Label") / "Labels.txt"
NO_MASK = "0"


def parse_labels_file(path: Path) -> list[tuple[bool, str, str | None]]:
    """Rows of a DAGM ``Labels.txt``: ``(defective, image file, mask file or None)``."""
    if not path.is_file():
        raise DataError(f"{path}: Labels.txt missing; DAGM needs {LAYOUT}")
    rows = []
    lines = path.read_text(errors="replace").splitlines()
    for number, line in enumerate(lines, start=1):
        fields = line.split()
        if not fields or (number == 1 and len(fields) == 1):
            continue  # blank lines; the header line "1"
        if len(fields) != 5 or fields[1] not in ("0", "1"):
            raise DataError(
                f"{path}:{number}: expected 5 tab-separated fields '<n> <defective 0/1> <image> 0 <mask or 0>', "
                f"got {line!r}"
            )
        defective = fields[1] == "1"
        mask = None if fields[4] == NO_MASK else fields[4]
        if defective and mask is None:
            raise DataError(f"{path}:{number}: image {fields[2]} is marked defective but has no mask file")
        rows.append((defective, fields[2], mask))
    return rows


class DAGM2007(DefectDataset):
    """DAGM 2007 with its official Train / Test split.

    Args:
        root: the ``DAGM_data`` folder.
        class_names: background first, then one name per selected class (or one defect name if ``binary``).
        classes: texture classes ``k`` of the ``Class<k>`` folders to use.
        binary: one defect class for every texture instead of one per texture.
        defective_only: leave out defect-free images (UAPS).
        mask_threshold: mask values at or above this are defect.
        official_test: the Test folders are the test pool (true); false: Train folders only, the test part
            is carved from them (``dataset.test_fraction``; the UAPS DAGM code's 20 %).
        in_channels: 1 (grayscale) or 3.
        ignore_index: mask value of unlabeled pixels (unused by DAGM's masks).
    """

    def __init__(
        self,
        root: str | Path,
        class_names: Sequence[str] = ("background", "Class1", "Class2", "Class3", "Class4", "Class5", "Class6"),
        classes: Sequence[int] = (1, 2, 3, 4, 5, 6),
        binary: bool = False,
        defective_only: bool = True,
        mask_threshold: int = 128,
        in_channels: int = 1,
        ignore_index: int = 255,
        name: str = "dagm",
        official_test: bool = True,
    ) -> None:
        self.classes = [int(k) for k in classes]
        if not self.classes or len(set(self.classes)) != len(self.classes) or min(self.classes) < 1:
            raise ConfigError(f"dataset.source.classes={list(classes)} must list distinct texture classes k >= 1")
        expected = 2 if binary else len(self.classes) + 1
        if len(class_names) != expected:
            what = "background + one defect class (binary: true)" if binary else "background + one per selected class"
            raise ConfigError(
                f"dataset.class_names has {len(class_names)} names for classes={self.classes}, binary={binary}; "
                f"give {expected}: {what}"
            )
        self.root = Path(root)
        self.binary = binary
        self.defective_only = defective_only
        self.mask_threshold = mask_threshold
        self.official_test = official_test
        super().__init__(name, class_names, in_channels, ignore_index)

    def label_of(self, texture_class: int) -> int:
        """The mask label of a defect on ``Class<texture_class>``."""
        return 1 if self.binary else self.classes.index(texture_class) + 1

    def index(self) -> None:
        require_root(self.name, self.root, LAYOUT, SOURCE)
        pools: dict[str, list[Sample]] = {"Train": [], "Test": []} if self.official_test else {"Train": []}
        for texture_class in self.classes:
            for split, pool in pools.items():
                folder = self.root / f"Class{texture_class}" / split
                if not folder.is_dir():
                    raise DataError(
                        f"{folder}: folder missing for dataset.source.classes={self.classes}; DAGM needs {LAYOUT}"
                    )
                pool += self._index_folder(folder, texture_class, split)
        self.train_samples = pools["Train"]
        self.test_samples = pools["Test"] if self.official_test else None

    def _index_folder(self, folder: Path, texture_class: int, split: str) -> list[Sample]:
        labels_path = folder / LABELS_FILE
        rows = parse_labels_file(labels_path)
        on_disk = {p.name for p in folder.iterdir() if p.suffix.lower() == ".png"}
        listed = {image for _, image, _ in rows}
        unlisted = sorted(on_disk - listed)
        if unlisted:
            raise DataError(
                f"{folder / unlisted[0]}: image not listed in {labels_path} ({len(unlisted)} such images); "
                "restore the original Labels.txt or remove the extra images"
            )
        samples = []
        label = self.label_of(texture_class)
        for defective, image_name, mask_name in rows:
            image = folder / image_name
            if image_name not in on_disk:
                raise DataError(f"{image}: listed in {labels_path} but missing; re-extract Class{texture_class}")
            if mask_name is None:
                if self.defective_only:
                    continue
                mask: Path | int = EMPTY_MASK
            else:
                mask = folder / "Label" / mask_name
                if not mask.is_file():
                    raise DataError(f"{mask}: mask listed in {labels_path} for {image_name} is missing")
            classes = frozenset([label]) if defective else frozenset()
            samples.append(Sample(f"Class{texture_class}/{split}/{Path(image_name).stem}", image, mask, classes))
        return samples

    def load_mask(self, sample: Sample) -> np.ndarray:
        raw = read_mask_file(Path(sample.mask))
        texture_class = int(sample.id.split("/")[0].removeprefix("Class"))
        return np.where(raw >= self.mask_threshold, self.label_of(texture_class), 0).astype(np.int64)
