"""The part of ``results.json`` that names a run, shared by everything that writes or reads it."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig


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
