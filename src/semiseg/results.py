"""``results.json``: the file names of a run directory and the one schema that every run writes and every
reader (resume, report, sweeps) reads."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

RESULTS_FILE = "results.json"
SPLIT_FILE = "split.json"
CONFIG_FILE = "config.yaml"
PER_IMAGE_FILE = "per_image.csv"  # one row per test image (semiseg.callbacks.PerImageCSV)


def run_identity(cfg: DictConfig) -> dict[str, Any]:
    """``method``, ``dataset``, ``model``, ``labeled_ratio``, ``seed``, ``split_seed`` of the run ``cfg`` describes."""
    return {
        "method": cfg.method.name,
        "dataset": cfg.dataset.name,
        "model": cfg.model.name,
        "labeled_ratio": float(cfg.labeled_ratio),
        "seed": int(cfg.seed),
        "split_seed": int(cfg.split_seed),
    }


def number(value: Any) -> float | None:
    """A metric as JSON can hold it: a float, or ``None`` for a missing, NaN or infinite value."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def checkpoint_step(path: str | Path | None) -> int | None:
    """The step in a checkpoint name: ``best-step<k>.ckpt`` (the suite's names avoid ``=``, which Hydra
    overrides reserve) or Lightning's default ``...step=<k>...``; ``None`` when the name holds no step."""
    if not path:
        return None
    match = re.search(r"step=?(\d+)", Path(path).stem)
    return int(match.group(1)) if match else None


def make_results(
    cfg: DictConfig,
    test_metrics: dict[str, Any],
    best_checkpoint: str | None,
    best_value: Any,
    best_step: int | None,
    steps: int,
    train_seconds: float,
    num_params: int,
    num_params_train: int,
    split_sizes: dict[str, int],
    output_dir: Path,
) -> dict[str, Any]:
    """The content of ``results.json`` for one fit of ``cfg`` (``output_dir`` anchors the checkpoint's path)."""
    return {
        **run_identity(cfg),
        "num_params": int(num_params),
        "num_params_train": int(num_params_train),
        "split": split_sizes,
        "metrics": {key: number(value) for key, value in sorted(test_metrics.items()) if key.startswith("test/")},
        "best_val": {"metric": cfg.evaluation.monitor, "value": number(best_value), "step": best_step},
        "steps": int(steps),
        "train_seconds": round(train_seconds, 3),
        "checkpoint": relative_path(best_checkpoint, output_dir),
        "config": CONFIG_FILE,
    }


def relative_path(path: str | Path | None, root: Path) -> str | None:
    """``path`` relative to ``root`` (both resolved), or ``None`` for no path."""
    if not path:
        return None
    return str(Path(path).resolve().relative_to(Path(root).resolve()))
