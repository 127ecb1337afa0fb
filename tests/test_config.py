"""Every option of every config group composes, and builds what it names."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra.utils import instantiate

from conftest import compose_config
from semiseg.config import CONFIG_DIR

GROUPS = ["dataset", "model", "method", "optimizer", "scheduler", "augmentation", "trainer", "logger", "callbacks"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (Path(CONFIG_DIR) / group).glob("*.yaml"))


@pytest.mark.parametrize(("group", "option"), [(g, o) for g in GROUPS for o in options(g)])
def test_every_group_option_composes(group: str, option: str, tmp_path: Path) -> None:
    cfg = compose_config([f"{group}={option}"], tmp_path)
    assert cfg[group] is not None or option in ("none",)


@pytest.mark.parametrize("option", options("experiment"))
def test_every_experiment_composes(option: str, tmp_path: Path) -> None:
    cfg = compose_config([f"experiment={option}"], tmp_path)
    assert cfg.method.name


def test_defaults_are_the_documented_ones(tmp_path: Path) -> None:
    cfg = compose_config([], tmp_path, fast=False)
    assert (cfg.dataset.name, cfg.model.name, cfg.method.name) == ("synthetic", "unet", "supervised")
    assert cfg.labeled_ratio == 0.1 and cfg.seed == 0 and cfg.split_seed == 0
    assert cfg.evaluation.monitor == "val/mIoU"


def test_no_machine_paths_in_committed_yaml() -> None:
    for path in Path(CONFIG_DIR).rglob("*.yaml"):
        text = path.read_text()
        assert "/home/" not in text and "/root/" not in text and "/work/" not in text, path


def test_augmentations_instantiate(tmp_path: Path) -> None:
    import albumentations as A
    import numpy as np

    cfg = compose_config([], tmp_path)
    for part in ("weak", "strong"):
        specs = cfg.augmentation[part]
        transforms = [instantiate(spec) for spec in specs]
        assert transforms and all(isinstance(t, A.BasicTransform) for t in transforms)
        assert [type(t).__name__ for t in transforms] == [spec._target_.rsplit(".", 1)[-1] for spec in specs]
        image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
        mask = np.zeros((32, 32), dtype=np.uint8)
        out = A.Compose(transforms)(image=image, mask=mask)
        assert out["image"].shape == image.shape and out["mask"].shape == mask.shape
