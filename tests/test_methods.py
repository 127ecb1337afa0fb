"""Every method and every experiment config trains for a step on tiny data, so none can go stale."""

from __future__ import annotations

from pathlib import Path

import pytest

from semiseg.config import CONFIG_DIR
from semiseg.train import train

METHODS = sorted(p.stem for p in (Path(CONFIG_DIR) / "method").glob("*.yaml"))
EXPERIMENTS = sorted(p.stem for p in (Path(CONFIG_DIR) / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_a_step(method: str, make_cfg) -> None:
    results = train(make_cfg(f"method={method}", "trainer.fast_dev_run=true"))
    assert results["method"] == method
    assert results["steps"] >= 1
    assert 0.0 <= results["metrics"]["test/pixel_acc"] <= 1.0
    assert results["num_params_train"] >= results["num_params"] > 0


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_runs_its_budget_on_fake_data(experiment: str, make_cfg, fake_data_dir: Path) -> None:
    overrides = ("trainer.max_steps=1", "trainer.val_check_interval=1")  # a budget of one step, validated
    cfg = make_cfg(f"experiment={experiment}", f"paths.data_dir={fake_data_dir}", *overrides)
    results = train(cfg)
    if "curves" in results:  # a driver of several trainings (active learning): each one runs the whole budget
        points = [point for curve in results["curves"].values() for point in curve]
        assert len(points) == len(cfg.active_learning.strategies) * cfg.active_learning.rounds
        assert all(point["steps"] == cfg.trainer.max_steps == 1 for point in points)
        return
    assert results["steps"] == cfg.trainer.max_steps == 1  # the whole budget: no preset setting cuts it short
    assert results["best_val"]["step"] == 1 and results["checkpoint"] == "checkpoints/best-step1.ckpt"
