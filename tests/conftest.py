"""Shared fixtures: Hydra composition of the training config with tiny, fast settings."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
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


def real_data_dir(folder: str = "MTiles_data") -> Path | None:
    """``SEMISEG_DATA_DIR`` when it holds the real dataset ``folder`` (``MTiles_data``, ``NEU_data``), else ``None``."""
    value = os.environ.get("SEMISEG_DATA_DIR")
    if value and (Path(value) / folder).is_dir():
        return Path(value)
    return None


class Probe(L.Callback):
    """What a fit really ran with, seen from inside the trainer: the loggers, the networks' types, the memory
    format of their 4-D weights, and the dtype of the first network's output in a training step."""

    def __init__(self) -> None:
        self.fits = 0
        self.loggers: list[Any] = []
        self.child_types: list[type] = []
        self.channels_last: list[bool] = []
        self.devices: set[str] = set()
        self.output_dtypes: list[torch.dtype] = []
        self.dropout_types: set[type] = set()

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.fits += 1
        self.loggers = list(trainer.loggers)
        self.child_types = [type(child) for child in module.children()]
        # 4-D weights whose layout tells the formats apart (a 1x1 kernel or one input channel is both)
        weights = [p for p in module.parameters() if p.dim() == 4 and p.shape[1] > 1 and p.shape[2] * p.shape[3] > 1]
        self.channels_last = [p.is_contiguous(memory_format=torch.channels_last) for p in weights]
        self.devices = {p.device.type for p in module.parameters()}
        self.dropout_types = {type(m) for m in module.modules() if isinstance(m, torch.nn.Dropout)}
        network = next(child for child in module.children() if any(True for _ in child.parameters()))
        self._hook = network.register_forward_hook(self._record)

    def _record(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        if torch.is_tensor(output) and module.training:
            self.output_dtypes.append(output.dtype)

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._hook.remove()


@pytest.fixture
def probe(monkeypatch: pytest.MonkeyPatch) -> Probe:
    """A :class:`Probe` added to the callbacks of every fit that :func:`semiseg.runner.fit_and_test` runs."""
    from semiseg import runner

    watcher = Probe()
    build_callbacks = runner.build_callbacks
    monkeypatch.setattr(runner, "build_callbacks", lambda cfg, loggers: [*build_callbacks(cfg, loggers), watcher])
    return watcher


def pytest_runtest_setup(item: pytest.Item) -> None:
    """``@pytest.mark.gpu(min_gpus=N)``: skip unless N CUDA devices are there (lightning-hydra-template's RunIf)."""
    marker = item.get_closest_marker("gpu")
    if marker is not None:
        needed = int(marker.kwargs.get("min_gpus", 1))
        if torch.cuda.device_count() < needed:
            pytest.skip(f"needs {needed} CUDA GPU(s), found {torch.cuda.device_count()}")


@pytest.fixture(autouse=True)
def restore_root_log_handlers() -> Iterator[None]:
    """An entry point that configures logging (``logging.basicConfig`` in ``semiseg.report``) binds the root
    handler to the stream pytest captured for that test; drop it afterwards so later tests do not write to a
    closed stream."""
    root = logging.getLogger()
    before = list(root.handlers)
    yield
    for handler in root.handlers[:]:
        if handler not in before:
            root.removeHandler(handler)
