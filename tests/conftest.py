"""Shared fixtures: Hydra composition of the training config with tiny, fast settings."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
from omegaconf import DictConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))  # for tests/data generators

from semiseg import config

# Everything small: 40 synthetic images of 32x32, tiny batches, two steps, no workers.
FAST = [
    "++dataset.num_images=40",  # synthetic only; other datasets ignore it
    "dataset.image_size=[32,32]",
    "data.num_workers=0",
    "data.batch_size_labeled=4",
    "data.batch_size_unlabeled=4",
    "data.batch_size_eval=8",
    "trainer.max_steps=2",
    "trainer.val_check_interval=1",
    "trainer.num_sanity_val_steps=0",
    "trainer.log_every_n_steps=1",
    "trainer.enable_model_summary=false",
]


def compose_config(overrides: Sequence[str] = (), output_dir: Path | None = None, fast: bool = True) -> DictConfig:
    """The training config as the app would see it (with the tiny settings unless ``fast=False``), with
    ``paths.output_dir`` set."""
    return config.compose_config([*(FAST if fast else []), *overrides], output_dir)


@pytest.fixture
def make_cfg(tmp_path: Path) -> Callable[..., DictConfig]:
    def factory(*overrides: str, fast: bool = True) -> DictConfig:
        return compose_config(overrides, tmp_path / "run", fast=fast)

    return factory


@pytest.fixture(autouse=True, scope="session")
def cache_in_tmp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Caches written by any test (e.g. the datasets' mask index) go to a temporary folder, not the repo."""
    previous = os.environ.get("SEMISEG_CACHE_DIR")
    cache = tmp_path_factory.mktemp("cache")
    os.environ["SEMISEG_CACHE_DIR"] = str(cache)
    yield cache
    if previous is None:
        os.environ.pop("SEMISEG_CACHE_DIR", None)
    else:
        os.environ["SEMISEG_CACHE_DIR"] = previous


@pytest.fixture(scope="session")
def fake_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data dir holding every fake dataset in its official layout."""
    from data.make_fake_datasets import make_fake_all
    from data.make_fake_mtiles import make_fake_mtiles

    root = tmp_path_factory.mktemp("data")
    make_fake_mtiles(root / "MTiles_data")
    make_fake_all(root)  # NEU_data, DAGM_data, KoSDD2_data, Folder_data
    return root


def real_data_dir() -> Path | None:
    value = os.environ.get("SEMISEG_DATA_DIR")
    if value and (Path(value) / "MTiles_data").is_dir():
        return Path(value)
    return None
