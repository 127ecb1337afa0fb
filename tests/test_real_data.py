"""On the real Magnetic Tiles data (SEMISEG_DATA_DIR/MTiles_data); skipped when it is absent."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from conftest import real_data_dir
from semiseg.data.datasets.mtiles import MagneticTiles
from semiseg.train import train

DATA_DIR = real_data_dir()
pytestmark = [
    pytest.mark.real_data,
    pytest.mark.skipif(DATA_DIR is None, reason="set SEMISEG_DATA_DIR to a folder holding MTiles_data"),
]
NAMES = ["background", "Blowhole", "Break", "Crack", "Fray", "Uneven"]
COUNTS = {"Blowhole": 115, "Break": 85, "Crack": 57, "Fray": 32, "Uneven": 103}


def test_index_matches_the_published_counts() -> None:
    dataset = MagneticTiles(DATA_DIR / "MTiles_data", class_names=NAMES)
    assert Counter(s.id.split("/")[0] for s in dataset.train_samples) == COUNTS
    with_free = MagneticTiles(DATA_DIR / "MTiles_data", class_names=NAMES, defective_only=False)
    assert len(with_free.train_samples) == 1344


def test_masks_take_the_folder_class() -> None:
    dataset = MagneticTiles(DATA_DIR / "MTiles_data", class_names=NAMES)
    rng = np.random.default_rng(0)
    for index in rng.choice(len(dataset.train_samples), size=20, replace=False):
        sample = dataset.train_samples[index]
        image, mask = dataset.load(sample)
        assert image.shape[:2] == mask.shape and image.dtype == np.uint8
        assert set(np.unique(mask)) <= {0, NAMES.index(sample.id.split("/")[0])}


def test_a_short_supervised_run_on_mtiles(make_cfg) -> None:
    cfg = make_cfg("dataset=mtiles", f"paths.data_dir={DATA_DIR}", "dataset.image_size=[64,64]", "labeled_ratio=0.1")
    results = train(cfg)
    assert results["dataset"] == "mtiles" and results["steps"] == 2
    assert results["split"]["test"] == round(0.2 * 392)
    assert sum(results["split"].values()) == 392
    assert Path(cfg.paths.output_dir, "results.json").is_file()
