"""Write tiny fake NEU-Seg, DAGM 2007, KolektorSDD2 and ``folder`` datasets in their official layouts.

    NEU_data/images/{training,test}/<id>.jpg, annotations/{training,test}/<id>.png   (values 0-3)
    DAGM_data/Class<k>/{Train,Test}/<id>.PNG, Label/<id>_label.PNG, Label/Labels.txt
    KoSDD2_data/{train,test}/<id>.png with <id>_GT.png                                (portrait images)
    Folder_data/images/<name>.{png,jpg}, masks/<name>.png (0/255), [unlabeled/], [splits/*.txt]

Usage: python tests/data/make_fake_datasets.py OUT_DIR   (also writes MTiles_data, so that OUT_DIR works
as paths.data_dir for every dataset=...)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import cv2
import numpy as np

NEU_CLASSES = ("inclusion", "patches", "scratches")
DAGM_CLASSES = (1, 2, 3, 4, 5, 6)


def _texture(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    return rng.integers(70, 170, size=(height, width), dtype=np.uint8)


def _blob(mask: np.ndarray, rng: np.random.Generator, value: int) -> None:
    height, width = mask.shape
    center = (int(rng.integers(6, width - 6)), int(rng.integers(6, height - 6)))
    axes = (int(rng.integers(3, max(4, width // 5))), int(rng.integers(3, max(4, height // 5))))
    cv2.ellipse(mask, center, axes, float(rng.integers(0, 180)), 0, 360, value, -1)


def make_fake_neu(root: Path, train: int = 9, test: int = 4, size: int = 40, seed: int = 0) -> Path:
    """NEU-Seg: RGB jpg images, class-index png masks; some images hold two classes."""
    rng = np.random.default_rng(seed)
    for folder, count in (("training", train), ("test", test)):
        (root / "images" / folder).mkdir(parents=True, exist_ok=True)
        (root / "annotations" / folder).mkdir(parents=True, exist_ok=True)
        for index in range(count):
            gray = _texture(rng, size, size)
            mask = np.zeros((size, size), np.uint8)
            classes = [index % 3 + 1] + ([(index + 1) % 3 + 1] if index % 4 == 0 else [])
            for value in classes:
                _blob(mask, rng, value)
            gray[mask > 0] //= 2
            stem = f"{NEU_CLASSES[index % 3][:2]}_{index:03d}"
            cv2.imwrite(str(root / "images" / folder / f"{stem}.jpg"), cv2.merge([gray, gray, gray]))
            cv2.imwrite(str(root / "annotations" / folder / f"{stem}.png"), mask)
    return root


def make_fake_dagm(
    root: Path,
    classes: tuple[int, ...] = DAGM_CLASSES,
    defective: tuple[int, int] = (3, 2),
    free: tuple[int, int] = (2, 1),
    size: int = 48,
    seed: int = 0,
) -> Path:
    """DAGM 2007: per class and split, ``defective`` images with masks and ``free`` without (Train, Test)."""
    rng = np.random.default_rng(seed)
    for texture_class in classes:
        for split_index, split in enumerate(("Train", "Test")):
            folder = root / f"Class{texture_class}" / split
            (folder / "Label").mkdir(parents=True, exist_ok=True)
            rows = ["1"]
            count = defective[split_index] + free[split_index]
            for index in range(count):
                image_name = f"{index:04d}.PNG"
                image = _texture(rng, size, size)
                if index < defective[split_index]:
                    mask = np.zeros((size, size), np.uint8)
                    _blob(mask, rng, 255)
                    image[mask > 0] //= 3
                    mask_name = f"{index:04d}_label.PNG"
                    cv2.imwrite(str(folder / "Label" / mask_name), mask)
                    rows.append(f"{index + 1}\t1\t{image_name}\t0\t{mask_name}")
                else:
                    rows.append(f"{index + 1}\t0\t{image_name}\t0\t0")
                cv2.imwrite(str(folder / image_name), image)
            (folder / "Label" / "Labels.txt").write_text("\n".join(rows) + "\n")
    return root


def make_fake_kosdd2(
    root: Path, train: int = 10, test: int = 5, positives: tuple[int, int] = (3, 2), seed: int = 0
) -> Path:
    """KolektorSDD2: portrait colour images (about 1:2.7 like 230x630), ``<id>_GT.png`` masks, few defects."""
    rng = np.random.default_rng(seed)
    number = 10000
    for split_index, (split, count) in enumerate((("train", train), ("test", test))):
        folder = root / split
        folder.mkdir(parents=True, exist_ok=True)
        for index in range(count):
            height, width = 63 + int(rng.integers(-2, 3)), 23
            image = np.stack([_texture(rng, height, width) for _ in range(3)], axis=2)
            mask = np.zeros((height, width), np.uint8)
            if index < positives[split_index]:
                _blob(mask, rng, 255)
                image[mask > 0] = (200, 60, 40)
            cv2.imwrite(str(folder / f"{number}.png"), image)
            cv2.imwrite(str(folder / f"{number}_GT.png"), mask)
            number += 1
    return root


def make_fake_folder(
    root: Path, labeled: int = 12, unlabeled: int = 0, splits: bool = False, seed: int = 0, size: int = 36
) -> Path:
    """A user's folder: png and jpg images, 0/255 png masks; optional ``unlabeled/`` and ``splits/``."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    names = []
    for index in range(labeled):
        image = np.stack([_texture(rng, size, size)] * 3, axis=2)
        mask = np.zeros((size, size), np.uint8)
        if index % 3 != 2:
            _blob(mask, rng, 255)
            image[mask > 0] = (30, 30, 30)
        name = f"part_{index:02d}"
        names.append(name)
        suffix = ".jpg" if index % 2 else ".png"
        cv2.imwrite(str(root / "images" / f"{name}{suffix}"), image)
        cv2.imwrite(str(root / "masks" / f"{name}.png"), mask)
    if unlabeled:
        (root / "unlabeled").mkdir(exist_ok=True)
        for index in range(unlabeled):
            cv2.imwrite(str(root / "unlabeled" / f"raw_{index:02d}.png"), _texture(rng, size, size))
    if splits:
        (root / "splits").mkdir(exist_ok=True)
        (root / "splits" / "test.txt").write_text("\n".join(names[:3]) + "\n")
        (root / "splits" / "val.txt").write_text("# validation\n" + "\n".join(f"{n}.png" for n in names[3:5]) + "\n")
        (root / "splits" / "train.txt").write_text("\n".join(names[5:]) + "\n")
    return root


def make_fake_all(root: Path) -> Path:
    """Every fake layout under ``root`` (a ``paths.data_dir``), the MT one included."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from data.make_fake_mtiles import make_fake_mtiles

    if not (root / "MTiles_data").exists():
        make_fake_mtiles(root / "MTiles_data")
    make_fake_neu(root / "NEU_data")
    make_fake_dagm(root / "DAGM_data")
    make_fake_kosdd2(root / "KoSDD2_data")
    make_fake_folder(root / "Folder_data", unlabeled=6)
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="the data dir to fill (use it as paths.data_dir)")
    print(make_fake_all(parser.parse_args().out))


if __name__ == "__main__":
    main()
