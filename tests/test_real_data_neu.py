"""On the real NEU-Seg data (SEMISEG_DATA_DIR/NEU_data, official layout); skipped when it is absent."""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from conftest import real_data_dir
from semiseg.data.datasets.neu import NEUSeg
from semiseg.train import train

DATA_DIR = real_data_dir("NEU_data")
pytestmark = [
    pytest.mark.real_data,
    pytest.mark.skipif(DATA_DIR is None, reason="set SEMISEG_DATA_DIR to a folder holding NEU_data"),
]
NAMES = ["background", "inclusion", "patches", "scratches"]
# counted from the official release's masks (images holding each class; an image may hold several)
TRAIN_CLASS_IMAGES = {"inclusion": 1460, "patches": 1448, "scratches": 1429}
TEST_CLASS_IMAGES = {"inclusion": 364, "patches": 360, "scratches": 353}


def class_counts(samples) -> Counter:
    return Counter(NAMES[c] if isinstance(c, int) else c for sample in samples for c in sample.classes)


def test_index_matches_the_official_split_and_class_counts() -> None:
    dataset = NEUSeg(DATA_DIR / "NEU_data", class_names=NAMES)
    assert len(dataset.train_samples) == 3630 and len(dataset.test_samples) == 840
    assert class_counts(dataset.train_samples) == TRAIN_CLASS_IMAGES
    assert class_counts(dataset.test_samples) == TEST_CLASS_IMAGES
    # every image holds a defect: the papers' per-image metric scores every test image
    assert all(sample.classes for sample in dataset.test_samples)


def test_images_and_masks_are_200_pixels_with_class_indices() -> None:
    dataset = NEUSeg(DATA_DIR / "NEU_data", class_names=NAMES)
    rng = np.random.default_rng(0)
    for pool in (dataset.train_samples, dataset.test_samples):
        for index in rng.choice(len(pool), size=10, replace=False):
            image, mask = dataset.load(pool[index])
            assert image.shape == (200, 200, 3) and image.dtype == np.uint8 and mask.shape == (200, 200)
            assert set(np.unique(mask)) <= {0, 1, 2, 3} and (mask > 0).any()


def test_a_short_evidence_run_on_neu(make_cfg) -> None:
    cfg = make_cfg("experiment=evidence_neu_cpu", f"paths.data_dir={DATA_DIR}", "dataset.image_size=[32,32]")
    results = train(cfg)
    assert results["dataset"] == "neu" and results["steps"] == 2 and results["labeled_ratio"] == 0.1
    assert results["split"]["test"] == 840 and sum(results["split"].values()) == 3630 + 840
    assert results["metrics"]["test/images_without_defect"] == 0
    with Path(cfg.paths.output_dir, "per_image.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 840 and all(row["mIoU_image"] for row in rows)
