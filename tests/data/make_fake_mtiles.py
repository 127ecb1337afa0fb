"""Write a tiny fake Magnetic Tiles dataset in its official layout (for loader tests).

    <root>/MT_<Class>/Imgs/<stem>.jpg   grayscale image of varying size
    <root>/MT_<Class>/Imgs/<stem>.png   mask, 0 background / 255 defect with anti-aliased edges

Usage: python tests/data/make_fake_mtiles.py OUT_DIR [--per-class N]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np

CLASSES = ("Blowhole", "Break", "Crack", "Fray", "Uneven")


def make_fake_mtiles(root: Path, per_class: int = 4, free: int = 3, seed: int = 0) -> Path:
    """Create the layout under ``root`` (the ``MTiles_data`` folder) and return ``root``."""
    rng = np.random.default_rng(seed)
    for class_name in (*CLASSES, "Free"):
        folder = root / f"MT_{class_name}" / "Imgs"
        folder.mkdir(parents=True, exist_ok=True)
        count = free if class_name == "Free" else per_class
        for index in range(count):
            height, width = int(rng.integers(40, 70)), int(rng.integers(50, 90))
            image = rng.integers(60, 180, size=(height, width), dtype=np.uint8)
            mask = np.zeros((height, width), dtype=np.uint8)
            if class_name != "Free":
                center = (int(rng.integers(10, width - 10)), int(rng.integers(10, height - 10)))
                cv2.circle(mask, center, int(rng.integers(4, 9)), 255, -1, lineType=cv2.LINE_AA)
                image[mask > 127] //= 3
            stem = f"exp{index % 3}_num_{1000 + index}"
            cv2.imwrite(str(folder / f"{stem}.jpg"), image)
            cv2.imwrite(str(folder / f"{stem}.png"), mask)
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="the MTiles_data folder to create")
    parser.add_argument("--per-class", type=int, default=4)
    args = parser.parse_args()
    print(make_fake_mtiles(args.out, args.per_class))


if __name__ == "__main__":
    main()
