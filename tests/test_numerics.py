"""A NaN or Inf training loss: stop with a debug checkpoint and a message naming the term and step, or skip."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from semiseg.methods.supervised import Supervised


@pytest.fixture
def nan_from_step_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """The supervised loss becomes NaN from optimisation step 1 on."""
    original = Supervised.supervised_loss

    def poisoned(self, labeled):
        loss, terms = original(self, labeled)
        if self.global_step >= 1:
            loss = loss * torch.tensor(float("nan"))
        return loss, terms

    monkeypatch.setattr(Supervised, "supervised_loss", poisoned)


def test_nan_stops_with_debug_checkpoint(nan_from_step_one, make_cfg, capsys) -> None:
    from semiseg.train import train

    cfg = make_cfg("trainer.max_steps=4")
    with pytest.raises(SystemExit) as done:
        train(cfg)
    assert done.value.code == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("error: loss term 'train/loss_sup' is nan at step 1"), line
    debug = Path(cfg.paths.output_dir) / "checkpoints" / "debug-nonfinite-step1.ckpt"
    assert debug.is_file() and str(debug) in line
    state = torch.load(debug, weights_only=False)
    assert state["global_step"] == 1
    assert not (Path(cfg.paths.output_dir) / "results.json").exists()


def test_skip_counts_and_finishes(nan_from_step_one, make_cfg) -> None:
    from semiseg.train import train

    cfg = make_cfg("trainer.max_steps=3", "numerics.on_nonfinite=skip")
    results = train(cfg)
    assert results["steps"] == 3
    last = torch.load(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt", weights_only=False)
    assert all(torch.isfinite(value).all() for value in last["state_dict"].values())  # no NaN reached the weights
    assert results["metrics"]["test/mIoU"] is not None
    metrics = (Path(cfg.paths.output_dir) / "csv" / "metrics.csv").read_text()
    assert "train/skipped_batches" in metrics.splitlines()[0]


def test_skip_limit_stops(nan_from_step_one, make_cfg, capsys) -> None:
    from semiseg.train import train

    cfg = make_cfg("trainer.max_steps=5", "numerics.on_nonfinite=skip", "numerics.max_skipped=1")
    with pytest.raises(SystemExit):
        train(cfg)
    line = capsys.readouterr().err
    assert "at step 2" in line
    assert "set numerics.on_nonfinite=skip" not in line and "numerics.max_skipped=1" in line, line


def test_a_diverging_loss_is_warned_about(make_cfg, caplog: pytest.LogCaptureFixture) -> None:
    from semiseg.train import train

    train(make_cfg("trainer.max_steps=4", "optimizer.lr=1e6"))
    warned = [r.getMessage() for r in caplog.records if "loss is diverging" in r.getMessage()]
    assert len(warned) == 1 and "optimizer.lr (now 1000000.0)" in warned[0], warned


def test_a_normal_run_is_not_warned_about_divergence(make_cfg, caplog: pytest.LogCaptureFixture) -> None:
    from semiseg.train import train

    train(make_cfg("trainer.max_steps=4"))
    assert not [r for r in caplog.records if "loss is diverging" in r.getMessage()]
