"""Kill-and-resume: a run stopped at step k and resumed with ``resume=true`` ends exactly like one that was
never interrupted (CPU, ``trainer.deterministic=true``, ``data.num_workers=0``).

``METHODS`` lists the methods checked; add a method's name to cover it.
"""

from __future__ import annotations

import csv
import os
import signal
from collections.abc import Callable
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from conftest import compose_config
from semiseg.resume import complete_results
from semiseg.train import train

METHODS = ["supervised", "uaps", "cps", "mean_teacher"]
MAX_STEPS = 8
SETTINGS = [
    f"trainer.max_steps={MAX_STEPS}",
    "trainer.val_check_interval=3",
    "trainer.deterministic=true",
    "callbacks.resume_checkpoint.every_n_train_steps=2",
    "callbacks.prediction_overlays=null",
    "model.channels=[4,8,16,32,64]",  # a narrow U-Net: same code paths, less CPU
]


class StopAtStep(Callback):
    """Test helper: at the end of step ``step``, send ``how`` (a signal name) to this process, or crash
    (``how=crash``: an exception, like a killed process that left only its periodic checkpoints)."""

    def __init__(self, step: int, how: str) -> None:
        self.step, self.how = step, how

    def on_train_batch_end(self, trainer: L.Trainer, *args, **kwargs) -> None:
        if trainer.global_step != self.step:
            return
        if self.how == "crash":
            raise RuntimeError(f"simulated crash at step {self.step}")
        os.kill(os.getpid(), getattr(signal, self.how))


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]


def logged_rows(run_dir: Path) -> list[dict[str, str]]:
    """The rows of the run's ``csv/metrics.csv`` without ``epoch`` (Lightning counts one more epoch after a
    resume from a checkpoint written at an epoch's end; the steps are the same)."""
    with open(run_dir / "csv" / "metrics.csv", newline="") as file:
        return [{key: value for key, value in row.items() if key != "epoch"} for row in csv.DictReader(file)]


def run(run_dir: Path, *overrides: str) -> dict:
    return train(compose_config([*SETTINGS, *overrides], run_dir))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], tuple[dict, Path]]:
    """The uninterrupted run of a method (trained once per module, on first use)."""
    runs: dict[str, tuple[dict, Path]] = {}

    def get(method: str) -> tuple[dict, Path]:
        if method not in runs:
            run_dir = tmp_path_factory.mktemp(f"straight-{method}")
            runs[method] = (run(run_dir, f"method={method}"), run_dir)
        return runs[method]

    return get


CASES = [
    *[(method, "SIGTERM", 5) for method in METHODS],  # between validations
    ("supervised", "SIGINT", 6),  # on a validation step: the checkpoint waits for validation
    ("supervised", "crash", 5),  # no handler ran: continue from the periodic checkpoint of step 4
]


@pytest.mark.parametrize(("method", "how", "step"), CASES)
def test_killed_and_resumed_run_equals_uninterrupted_run(
    method: str, how: str, step: int, uninterrupted: Callable[[str], tuple[dict, Path]], tmp_path: Path
) -> None:
    expected, expected_dir = uninterrupted(method)
    stopper = [f"+callbacks.stop._target_={__name__}.StopAtStep", f"+callbacks.stop.step={step}"]
    stopper.append(f"+callbacks.stop.how={how}")
    if how == "crash":
        with pytest.raises(RuntimeError, match="simulated crash"):
            run(tmp_path, f"method={method}", *stopper)
        assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == step - 1
    else:
        with pytest.raises(SystemExit) as stopped:
            run(tmp_path, f"method={method}", *stopper)
        assert stopped.value.code == 128 + getattr(signal, how)
        assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == step
    assert not (tmp_path / "results.json").exists()

    resumed = run(tmp_path, f"method={method}", "resume=true")
    assert resumed["steps"] == expected["steps"] == MAX_STEPS
    assert resumed["metrics"] == expected["metrics"]
    assert resumed["best_val"] == expected["best_val"]
    final, reference = weights(tmp_path), weights(expected_dir)
    assert final.keys() == reference.keys()
    for name in reference:
        assert torch.equal(final[name], reference[name]), name
    # metrics.csv keeps what was logged before the stop and logs nothing twice: the straight run's table, less
    # the training row of the step the run stopped in (it stops inside that step's hooks, before the logging)
    resumed_rows, straight_rows = logged_rows(tmp_path), logged_rows(expected_dir)
    missing = [row for row in straight_rows if row not in resumed_rows]
    assert resumed_rows == [row for row in straight_rows if row not in missing]
    assert all(row["train/loss"] and int(row["step"]) == step - 1 for row in missing), missing


def test_resume_skips_a_complete_run(tmp_path: Path) -> None:
    first = run(tmp_path, "trainer.max_steps=2")
    stamp = (tmp_path / "results.json").stat().st_mtime_ns
    again = run(tmp_path, "trainer.max_steps=2", "resume=true")
    assert again == first and (tmp_path / "results.json").stat().st_mtime_ns == stamp


def test_resume_continues_when_the_budget_grew(tmp_path: Path) -> None:
    run(tmp_path, "trainer.max_steps=2")
    cfg = compose_config([*SETTINGS, "trainer.max_steps=4", "resume=true"], tmp_path)
    assert complete_results(tmp_path / "results.json", cfg) is None
    assert train(cfg)["steps"] == 4
    rows = logged_rows(tmp_path)  # the first two steps' metrics and test result are still in metrics.csv
    assert [int(row["step"]) for row in rows if row["train/loss"]] == [0, 1, 2, 3]
    assert [int(row["step"]) for row in rows if row["test/mIoU"]] == [2, 4]


def test_resume_without_checkpoint_trains_from_scratch(tmp_path: Path) -> None:
    assert run(tmp_path, "trainer.max_steps=2", "resume=true")["steps"] == 2
