"""NEU-Seg, DAGM 2007, KolektorSDD2 and ``folder`` on tiny fakes in their official layouts: indexing,
masks, the cached mask index, every bad-input error, and one training step each through the app."""

from __future__ import annotations

import os
from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from data.make_fake_datasets import make_fake_dagm, make_fake_folder, make_fake_kosdd2, make_fake_neu
from semiseg.data.datamodule import SemiSupervisedDataModule
from semiseg.data.datasets import index_cache
from semiseg.data.datasets.base import EMPTY_MASK
from semiseg.data.datasets.dagm import DAGM2007
from semiseg.data.datasets.folder import ImageFolder
from semiseg.data.datasets.kosdd2 import KolektorSDD2
from semiseg.data.datasets.neu import NEUSeg
from semiseg.data.transforms import ViewMaker
from semiseg.errors import ConfigError, DataError, DatasetNotFoundError
from semiseg.train import train

BINARY = {0: 0, 255: 1}


def datamodule(dataset, ratio: float = 0.3, **kwargs) -> SemiSupervisedDataModule:
    options = {
        "labeled_ratio": ratio, "split_seed": 0, "val_fraction": 0.2, "test_fraction": 0.2,
        "image_size": (32, 32), "mean": [0.5] * dataset.in_channels, "std": [0.25] * dataset.in_channels,
        "num_workers": 0, "batch_size_labeled": 2, "batch_size_unlabeled": 2, "batch_size_eval": 2,
    }  # fmt: skip
    return SemiSupervisedDataModule(dataset, **{**options, **kwargs})


# ---- NEU-Seg ---------------------------------------------------------------------------------------
def test_neu_official_split_and_classes_from_masks(tmp_path: Path) -> None:
    root = make_fake_neu(tmp_path / "NEU_data", train=9, test=4)
    dataset = NEUSeg(root, cache_dir=tmp_path / "cache")
    assert len(dataset.train_samples) == 9 and len(dataset.test_samples) == 4
    assert all(s.id.startswith("training/") for s in dataset.train_samples)
    assert any(len(s.classes) == 2 for s in dataset.train_samples)  # several classes in one image
    for sample in dataset.train_samples:
        image, mask = dataset.load(sample)
        assert image.shape == (40, 40, 3) and mask.dtype == np.int64
        assert set(np.unique(mask)) - {0} == set(sample.classes)
    split = datamodule(dataset).split
    assert sorted(split.test) == sorted(s.id for s in dataset.test_samples)


def test_mask_index_is_cached_and_refreshed_when_a_mask_changes(tmp_path: Path, monkeypatch) -> None:
    root = make_fake_neu(tmp_path / "NEU_data", train=6, test=2)
    cache = tmp_path / "cache"
    first = NEUSeg(root, cache_dir=cache)
    files = list((cache / "index").glob("neu-*.json"))
    assert len(files) == 1
    scanned: list[str] = []
    original = index_cache.scan_mask
    monkeypatch.setattr("semiseg.data.datasets.neu.scan_mask", lambda d, s: scanned.append(s.id) or original(d, s))
    second = NEUSeg(root, cache_dir=cache)
    assert scanned == [] and [s.classes for s in second.train_samples] == [s.classes for s in first.train_samples]
    mask_path = root / "annotations" / "training" / f"{first.train_samples[0].id.split('/')[1]}.png"
    cv2.imwrite(str(mask_path), np.full((40, 40), 3, np.uint8))
    os.utime(mask_path, ns=(1, 1))
    third = NEUSeg(root, cache_dir=cache)
    assert scanned == [first.train_samples[0].id]
    assert third.train_samples[0].classes == frozenset({3})


def test_neu_palette_masks_give_indices(tmp_path: Path) -> None:
    root = make_fake_neu(tmp_path / "NEU_data", train=3, test=1)
    mask_path = next((root / "annotations" / "training").glob("*.png"))
    values = cv2.imread(str(mask_path), cv2.IMREAD_GRAYSCALE)
    palette_image = Image.fromarray(values, mode="L").convert("P")
    palette_image.putpalette([0, 0, 0, 250, 0, 0, 0, 250, 0, 0, 0, 250] + [0] * 756)
    palette_image.save(mask_path)
    dataset = NEUSeg(root)
    sample = next(s for s in dataset.train_samples if s.mask == mask_path)
    assert np.array_equal(dataset.load(sample)[1], values)


def test_neu_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError, match=r"NEU_data.*annotations"):
        NEUSeg(tmp_path / "none" / "NEU_data")
    root = make_fake_neu(tmp_path / "a" / "NEU_data", train=3, test=1)
    bad = next((root / "annotations" / "training").glob("*.png"))
    cv2.imwrite(str(bad), np.full((40, 40), 7, np.uint8))
    with pytest.raises(DataError, match=rf"{bad.name}: mask values \[7\] are outside the classes 0..3"):
        NEUSeg(root)
    root = make_fake_neu(tmp_path / "b" / "NEU_data", train=3, test=1)
    next((root / "annotations" / "test").glob("*.png")).unlink()
    with pytest.raises(DataError, match="image has no mask"):
        NEUSeg(root)
    root = make_fake_neu(tmp_path / "c" / "NEU_data", train=3, test=1)
    bad = next((root / "annotations" / "training").glob("*.png"))
    cv2.imwrite(str(bad), np.zeros((20, 40), np.uint8))
    with pytest.raises(DataError, match=r"mask is 40x20 but its image .* is 40x40"):
        NEUSeg(root)  # caught at indexing from the image header, without decoding the image
    root = make_fake_neu(tmp_path / "d" / "NEU_data", train=3, test=1)
    (root / "images" / "test").rename(root / "images" / "testing")
    with pytest.raises(DataError, match=r"images/test: folder missing"):
        NEUSeg(root)


# ---- DAGM 2007 -------------------------------------------------------------------------------------
def test_dagm_labels_txt_classes_and_official_split(tmp_path: Path) -> None:
    root = make_fake_dagm(tmp_path / "DAGM_data")
    dataset = DAGM2007(root)
    assert len(dataset.train_samples) == 6 * 3 and len(dataset.test_samples) == 6 * 2  # defective only
    assert dataset.num_classes == 7 and dataset.in_channels == 1
    sample = next(s for s in dataset.train_samples if s.id.startswith("Class4/Train/"))
    image, mask = dataset.load(sample)
    assert image.shape == (48, 48, 1) and set(np.unique(mask)) == {0, 4} and sample.classes == {4}


def test_dagm_selected_classes_binary_and_defect_free(tmp_path: Path) -> None:
    root = make_fake_dagm(tmp_path / "DAGM_data", classes=(2, 5))
    dataset = DAGM2007(root, classes=[2, 5], class_names=["background", "c2", "c5"])
    c5 = next(s for s in dataset.train_samples if s.id.startswith("Class5/"))
    assert set(np.unique(dataset.load(c5)[1])) == {0, 2}  # Class5 is the second selected class
    binary = DAGM2007(root, classes=[2, 5], class_names=["background", "defect"], binary=True)
    assert {c for s in binary.train_samples for c in s.classes} == {1}
    everything = DAGM2007(root, classes=[2, 5], class_names=["background", "c2", "c5"], defective_only=False)
    assert len(everything.train_samples) == 2 * (3 + 2)
    free = [s for s in everything.train_samples if s.mask == EMPTY_MASK]
    assert len(free) == 4 and all(s.classes == frozenset() for s in free)
    image, mask = everything.load(free[0])
    assert mask.shape == image.shape[:2] and not mask.any()


def test_dagm_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"dataset.class_names has 7 names .* give 3"):
        DAGM2007(tmp_path, classes=[1, 2])
    root = make_fake_dagm(tmp_path / "a" / "DAGM_data", classes=(1,))
    with pytest.raises(DataError, match=r"Class2/Train: folder missing"):
        DAGM2007(root, classes=[1, 2], class_names=["background", "a", "b"])
    cv2.imwrite(str(root / "Class1" / "Train" / "9999.PNG"), np.zeros((48, 48), np.uint8))
    with pytest.raises(DataError, match=r"9999.PNG: image not listed in .*Labels.txt"):
        DAGM2007(root, classes=[1], class_names=["background", "a"])
    root = make_fake_dagm(tmp_path / "b" / "DAGM_data", classes=(1,))
    (root / "Class1" / "Test" / "Label" / "0000_label.PNG").unlink()
    with pytest.raises(DataError, match=r"0000_label.PNG: mask listed in .* is missing"):
        DAGM2007(root, classes=[1], class_names=["background", "a"])
    root = make_fake_dagm(tmp_path / "c" / "DAGM_data", classes=(1,))
    labels = root / "Class1" / "Train" / "Label" / "Labels.txt"
    labels.write_text(labels.read_text() + "7\t1\t0007.PNG\n")
    with pytest.raises(DataError, match=r"Labels.txt:7: expected 5 tab-separated fields"):
        DAGM2007(root, classes=[1], class_names=["background", "a"])
    root = make_fake_dagm(tmp_path / "d" / "DAGM_data", classes=(1,))
    (root / "Class1" / "Train" / "0001.PNG").write_bytes(b"broken")
    dataset = DAGM2007(root, classes=[1], class_names=["background", "a"])  # nothing decoded at start-up
    with pytest.raises(DataError, match=r"0001.PNG: cannot read this image"):
        dataset.load(next(s for s in dataset.train_samples if s.id.endswith("/0001")))


# ---- KolektorSDD2 ----------------------------------------------------------------------------------
def test_kosdd2_gt_pairs_and_positives_in_every_part(tmp_path: Path) -> None:
    root = make_fake_kosdd2(tmp_path / "KoSDD2_data", train=20, test=5, positives=(4, 2))
    dataset = KolektorSDD2(root, cache_dir=tmp_path / "cache")
    assert len(dataset.train_samples) == 20 and len(dataset.test_samples) == 5
    assert not any(s.id.endswith("_GT") for s in dataset.train_samples)
    assert sum(bool(s.classes) for s in dataset.train_samples) == 4
    split = datamodule(dataset, ratio=0.1).split
    positive = {s.id for s in [*dataset.train_samples, *dataset.test_samples] if s.classes}
    for part in ("labeled", "unlabeled", "val", "test"):
        assert positive & set(getattr(split, part)), part
    image, mask = dataset.load(dataset.train_samples[0])
    assert image.shape[0] > image.shape[1] and set(np.unique(mask)) == {0, 1}


def test_kosdd2_threshold_variant(tmp_path: Path) -> None:
    root = make_fake_kosdd2(tmp_path / "KoSDD2_data", train=2, test=1, positives=(1, 0))
    gt = root / "train" / "10000_GT.png"
    raw = cv2.imread(str(gt), cv2.IMREAD_GRAYSCALE)
    raw[raw == 255] = 128
    cv2.imwrite(str(gt), raw)
    assert KolektorSDD2(root).train_samples[0].classes == {1}
    assert KolektorSDD2(root, mask_threshold=255).train_samples[0].classes == frozenset()


def test_kosdd2_non_square_size_batches_without_rotations(tmp_path: Path) -> None:
    uaps = [A.RandomRotate90(p=1.0), A.Transpose(p=1.0), A.HorizontalFlip(p=0.5)]
    views = ViewMaker((64, 32), [0.5] * 3, [0.25] * 3, in_channels=3, weak=uaps)
    assert [type(t).__name__ for t in views.geometry.transforms] == ["Resize", "HorizontalFlip"]
    root = make_fake_kosdd2(tmp_path / "KoSDD2_data", train=6, test=2)
    dataset = KolektorSDD2(root)
    module = datamodule(dataset, image_size=(64, 32), augmentation={"weak": uaps})
    batch = next(iter(module.train_dataloader()))[0]
    assert batch["labeled"]["image"].shape == (2, 3, 64, 32) and batch["labeled"]["mask"].shape == (2, 64, 32)


def test_kosdd2_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError, match=r"vicos.si"):
        KolektorSDD2(tmp_path / "KoSDD2_data")
    root = make_fake_kosdd2(tmp_path / "a" / "KoSDD2_data", train=3, test=1)
    (root / "train" / "10001_GT.png").unlink()
    with pytest.raises(DataError, match=r"10001.png: image has no mask .* <id>_GT.png"):
        KolektorSDD2(root)
    root = make_fake_kosdd2(tmp_path / "b" / "KoSDD2_data", train=3, test=1)
    (root / "test" / "10003.png").unlink()
    with pytest.raises(DataError, match=r"10003_GT.png: mask has no image"):
        KolektorSDD2(root)
    with pytest.raises(ConfigError, match="two classes"):
        KolektorSDD2(root, class_names=["a", "b", "c"])


# ---- folder ----------------------------------------------------------------------------------------
def test_folder_without_unlabeled(tmp_path: Path) -> None:
    root = make_fake_folder(tmp_path / "mine", labeled=10)
    dataset = ImageFolder(root, mask_values=BINARY)
    assert len(dataset.train_samples) == 10 and dataset.test_samples is None and not dataset.extra_unlabeled_samples
    split = datamodule(dataset).split
    assert len(split.test) == 2 and len(split.val) == 2 and not any(i.startswith("unlabeled/") for i in split.unlabeled)


def test_folder_with_unlabeled_images_needing_no_masks(tmp_path: Path) -> None:
    root = make_fake_folder(tmp_path / "mine", labeled=10, unlabeled=5)
    assert not (root / "masks" / "raw_00.png").exists()
    dataset = ImageFolder(root, mask_values=BINARY)
    module = datamodule(dataset)
    extra = {i for i in module.split.unlabeled if i.startswith("unlabeled/")}
    assert len(extra) == 5 and not extra & set(module.split.labeled + module.split.val + module.split.test)
    items = [module.part_dataset("unlabeled")[i] for i in range(len(module.parts["unlabeled"]))]
    assert all("mask" not in item for item in items)


def test_folder_split_files_are_honoured(tmp_path: Path) -> None:
    root = make_fake_folder(tmp_path / "mine", labeled=12, splits=True)
    dataset = ImageFolder(root, mask_values=BINARY)
    assert [s.id for s in dataset.test_samples] == ["part_00", "part_01", "part_02"]
    assert [s.id for s in dataset.val_samples] == ["part_03", "part_04"]
    split = datamodule(dataset).split
    assert split.val == ["part_03", "part_04"] and split.test == ["part_00", "part_01", "part_02"]
    assert len(split.labeled) + len(split.unlabeled) == 7


def test_folder_identity_mask_values(tmp_path: Path) -> None:
    root = make_fake_folder(tmp_path / "mine", labeled=3)
    for path in (root / "masks").glob("*.png"):
        mask = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
        cv2.imwrite(str(path), (mask > 0).astype(np.uint8) * 2)
    dataset = ImageFolder(root, class_names=["background", "a", "b"], mask_values=None)
    assert {c for s in dataset.train_samples for c in s.classes} == {2}


def test_folder_errors(tmp_path: Path) -> None:
    root = make_fake_folder(tmp_path / "a", labeled=4)
    with pytest.raises(DataError, match=r"mask values \[255\] are outside the classes 0..1"):
        ImageFolder(root, mask_values=None, ignore_index=254)
    with pytest.raises(DataError, match=r"mask values \[255\] are not in dataset.mask_values=\{0: 0, 128: 1\}"):
        ImageFolder(root, mask_values={0: 0, 128: 1}, ignore_index=254)
    with pytest.raises(ConfigError, match=r"dataset.mask_values"):
        ImageFolder(root, mask_values={0: 0, 255: 5})
    cv2.imwrite(str(root / "images" / "part_00.bmp"), np.zeros((36, 36, 3), np.uint8))
    with pytest.raises(DataError, match="two files named 'part_00'"):
        ImageFolder(root, mask_values=BINARY)
    root = make_fake_folder(tmp_path / "b", labeled=4)
    (root / "masks" / "part_01.png").unlink()
    with pytest.raises(DataError, match=r"part_01.jpg: image has no mask"):
        ImageFolder(root, mask_values=BINARY)
    root = make_fake_folder(tmp_path / "c", labeled=6, splits=True)
    (root / "splits" / "val.txt").write_text("part_05\nmissing_one\n")
    with pytest.raises(DataError, match=r"val.txt: 'part_05' is also listed|val.txt: 'missing_one' is not an image"):
        ImageFolder(root, mask_values=BINARY)
    (root / "splits" / "val.txt").write_text("missing_one\n")
    with pytest.raises(DataError, match=r"val.txt: 'missing_one' is not an image with a mask"):
        ImageFolder(root, mask_values=BINARY)
    root = make_fake_folder(tmp_path / "d", labeled=4)
    cv2.imwrite(str(root / "masks" / "part_02.png"), np.zeros((10, 36), np.uint8))
    with pytest.raises(DataError, match=r"part_02.png: mask is 36x10 but its image"):
        ImageFolder(root, mask_values=BINARY)
    with pytest.raises(DatasetNotFoundError, match=r"dataset.root"):
        ImageFolder(tmp_path / "empty")


# ---- through the training app ----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "size"), [("neu", "[32,32]"), ("dagm", "[32,32]"), ("kosdd2", "[64,32]"), ("folder", "[32,32]")]
)
def test_every_dataset_trains_with_fast_dev_run(name: str, size: str, make_cfg, fake_data_dir, tmp_path) -> None:
    cfg = make_cfg(
        f"dataset={name}",
        f"dataset.image_size={size}",
        f"paths.data_dir={fake_data_dir}",
        f"paths.cache_dir={tmp_path / 'cache'}",
        "trainer.fast_dev_run=true",
    )
    results = train(cfg)
    assert results["dataset"] == name and results["steps"] == 1
    assert (tmp_path / "cache").exists() == (name != "dagm")  # DAGM needs no mask index
    assert torch.isfinite(torch.tensor(results["metrics"]["test/mIoU_all"]))


def test_unreadable_masks_are_named_at_indexing(tmp_path: Path) -> None:
    root = make_fake_kosdd2(tmp_path / "KoSDD2_data", train=3, test=1)
    (root / "train" / "10001_GT.png").write_bytes(b"")
    with pytest.raises(DataError, match=r"10001_GT.png: cannot read this mask file"):
        KolektorSDD2(root)
    root = make_fake_folder(tmp_path / "mine", labeled=3)
    (root / "masks" / "part_01.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"part_01.png: cannot read this mask file"):
        ImageFolder(root, mask_values=BINARY)


def test_folder_mask_values_from_the_command_line(make_cfg, fake_data_dir: Path) -> None:
    from hydra.utils import instantiate

    cfg = make_cfg(
        "dataset=folder",
        f"paths.data_dir={fake_data_dir}",
        "dataset.class_names=[background,a,b]",
        "dataset.mask_values=[[0,0],[128,1],[255,2]]",
    )
    dataset = instantiate(cfg.dataset.source, _convert_="all")
    assert dataset.mask_values == {0: 0, 128: 1, 255: 2}
    assert {c for s in dataset.train_samples for c in s.classes} == {2}
    with pytest.raises(ConfigError, match=r"pairs \[\[stored, class\], ...\]"):
        ImageFolder(fake_data_dir / "Folder_data", mask_values=[[0, 0, 1]])
