"""Loaders on fake data in the official layouts, and their errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from data.make_fake_mtiles import CLASSES, make_fake_mtiles
from semiseg.data.datasets.base import DefectDataset, Sample
from semiseg.data.datasets.mtiles import MagneticTiles
from semiseg.data.datasets.synthetic import SyntheticDefects
from semiseg.errors import DataError, DatasetNotFoundError

NAMES = ("background", *CLASSES)


def test_mtiles_index_and_masks(fake_data_dir: Path) -> None:
    dataset = MagneticTiles(fake_data_dir / "MTiles_data", class_names=NAMES)
    assert len(dataset.train_samples) == 5 * 4 and dataset.test_samples is None
    for sample in dataset.train_samples:
        image, mask = dataset.load(sample)
        folder_class = NAMES.index(sample.id.split("/")[0])
        assert image.shape[:2] == mask.shape and image.shape[2] == 3
        assert set(np.unique(mask)) == {0, folder_class}
        assert sample.classes == frozenset([folder_class])


def test_mtiles_threshold_at_128(tmp_path: Path) -> None:
    root = make_fake_mtiles(tmp_path / "MTiles_data", per_class=1, free=0)
    mask_path = next((root / "MT_Crack" / "Imgs").glob("*.png"))
    raw = cv2.imread(str(mask_path), cv2.IMREAD_GRAYSCALE)
    dataset = MagneticTiles(root, class_names=NAMES)
    sample = next(s for s in dataset.train_samples if s.id.startswith("Crack/"))
    assert np.array_equal(dataset.load_mask(sample) > 0, raw >= 128)
    assert ((raw > 0) & (raw < 128)).sum() > 0  # anti-aliased edges exist and are background


def test_mtiles_free_images_only_on_request(fake_data_dir: Path) -> None:
    dataset = MagneticTiles(fake_data_dir / "MTiles_data", class_names=NAMES, defective_only=False)
    free = [s for s in dataset.train_samples if s.id.startswith("Free/")]
    assert len(free) == 3 and all(s.classes == frozenset() for s in free)
    assert not dataset.load(free[0])[1].any()


def test_mtiles_grayscale_channels(fake_data_dir: Path) -> None:
    dataset = MagneticTiles(fake_data_dir / "MTiles_data", class_names=NAMES, in_channels=1)
    assert dataset.load(dataset.train_samples[0])[0].shape[2] == 1


def test_missing_root_names_root_layout_and_source(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError) as error:
        MagneticTiles(tmp_path / "nowhere" / "MTiles_data", class_names=NAMES)
    message = str(error.value)
    assert "nowhere/MTiles_data" in message and "MT_<Class>" in message and "github.com" in message


def test_empty_root_is_missing(tmp_path: Path) -> None:
    (tmp_path / "MTiles_data").mkdir()
    with pytest.raises(DatasetNotFoundError):
        MagneticTiles(tmp_path / "MTiles_data", class_names=NAMES)


def test_image_without_mask_and_mask_without_image(tmp_path: Path) -> None:
    root = make_fake_mtiles(tmp_path / "a" / "MTiles_data", per_class=2, free=0)
    mask = next((root / "MT_Fray" / "Imgs").glob("*.png"))
    mask.unlink()
    with pytest.raises(DataError, match=r"image has no mask.*expected"):
        MagneticTiles(root, class_names=NAMES)
    root = make_fake_mtiles(tmp_path / "b" / "MTiles_data", per_class=2, free=0)
    next((root / "MT_Fray" / "Imgs").glob("*.jpg")).unlink()
    with pytest.raises(DataError, match="mask has no image"):
        MagneticTiles(root, class_names=NAMES)


def test_mask_of_another_size(tmp_path: Path) -> None:
    root = make_fake_mtiles(tmp_path / "MTiles_data", per_class=1, free=0)
    mask_path = next((root / "MT_Break" / "Imgs").glob("*.png"))
    cv2.imwrite(str(mask_path), np.zeros((7, 9), np.uint8))
    dataset = MagneticTiles(root, class_names=NAMES)
    sample = next(s for s in dataset.train_samples if s.id.startswith("Break/"))
    with pytest.raises(DataError, match=r"mask is 9x7 but its image"):
        dataset.load(sample)


def test_unreadable_image(tmp_path: Path) -> None:
    root = make_fake_mtiles(tmp_path / "MTiles_data", per_class=1, free=0)
    image_path = next((root / "MT_Uneven" / "Imgs").glob("*.jpg"))
    image_path.write_bytes(b"not an image")
    dataset = MagneticTiles(root, class_names=NAMES)
    sample = next(s for s in dataset.train_samples if s.id.startswith("Uneven/"))
    with pytest.raises(DataError, match="cannot read this image"):
        dataset.load(sample)


def test_missing_class_folder(tmp_path: Path) -> None:
    root = make_fake_mtiles(tmp_path / "MTiles_data", per_class=1, free=0)
    shutil.rmtree(root / "MT_Crack")
    with pytest.raises(Exception, match="MT_Crack"):
        MagneticTiles(root, class_names=NAMES)


class _ArrayDataset(DefectDataset):
    """A dataset held in memory, to exercise the shared checks."""

    def __init__(self, mask: np.ndarray) -> None:
        self.mask = mask
        super().__init__("arrays", ["background", "defect"])

    def index(self) -> None:
        self.train_samples = [Sample("only", 0, 0, frozenset())]

    def load_image(self, sample: Sample) -> np.ndarray:
        return np.zeros((*self.mask.shape, 3), np.uint8)

    def load_mask(self, sample: Sample) -> np.ndarray:
        return self.mask


def test_mask_values_outside_the_classes_are_named() -> None:
    dataset = _ArrayDataset(np.array([[0, 1], [7, 255]]))
    with pytest.raises(DataError, match=r"mask values \[7\] are outside the classes 0..1"):
        dataset.load(dataset.train_samples[0])


def test_synthetic_is_deterministic_and_independent_of_size() -> None:
    small, large = (
        SyntheticDefects(num_images=5, image_size=(64, 64)),
        SyntheticDefects(num_images=50, image_size=(64, 64)),
    )
    for a, b in zip(small.train_samples, large.train_samples[:5]):
        assert a.classes == b.classes
        assert np.array_equal(small.load(a)[0], large.load(b)[0])
    other_seed = SyntheticDefects(num_images=5, image_size=(64, 64), seed=1)
    assert not np.array_equal(small.load(small.train_samples[0])[0], other_seed.load(other_seed.train_samples[0])[0])


def test_synthetic_has_every_class_and_defect_free_images() -> None:
    dataset = SyntheticDefects(num_images=200, image_size=(64, 64))
    strata = [s.classes for s in dataset.train_samples]
    assert set().union(*strata) == {1, 2, 3, 4}
    assert 0.1 < sum(not s for s in strata) / len(strata) < 0.3
    image, mask = dataset.load(dataset.train_samples[0])
    assert image.dtype == np.uint8 and image.shape == (64, 64, 3) and mask.shape == (64, 64)
