"""Kill-and-resume: a run stopped at step k and resumed with ``resume=true`` ends exactly like one that was
never interrupted (CPU, ``trainer.deterministic=true``, ``data.num_workers=0``).

``METHODS`` lists the methods checked; add a method's name to cover it.
"""

from __future__ import annotations

import csv
import os
import shutil
import signal
from collections.abc import Callable
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from conftest import compose_config
from semiseg.resume import complete_results
from semiseg.train import CONFIG_DIR, train

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


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bits: NaN equals NaN (``torch.equal`` says a NaN buffer, e.g. cps_rg's ``loss_ema``
    before its first update, differs from itself)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.is_floating_point():
        return torch.equal(torch.nan_to_num(a, nan=0.0), torch.nan_to_num(b, nan=0.0)) and torch.equal(
            a.isnan(), b.isnan()
        )
    return torch.equal(a, b)


def settings_with(*overrides: str) -> list[str]:
    """SETTINGS with some of its keys given other values (Hydra refuses a key overridden twice)."""
    keys = {override.split("=", 1)[0] for override in overrides}
    return [*(s for s in SETTINGS if s.split("=", 1)[0] not in keys), *overrides]


def run(run_dir: Path, *overrides: str) -> dict:
    return train(compose_config(settings_with(*overrides), run_dir))


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
        assert bitwise_equal(final[name], reference[name]), name
    # metrics.csv keeps what was logged before the stop and logs nothing twice: the straight run's table, less
    # the training row of the step the run stopped in (it stops inside that step's hooks, before the logging)
    resumed_rows, straight_rows = logged_rows(tmp_path), logged_rows(expected_dir)
    missing = [row for row in straight_rows if row not in resumed_rows]
    assert resumed_rows == [row for row in straight_rows if row not in missing]
    assert all(row["train/loss"] and int(row["step"]) == step - 1 for row in missing), missing


def test_resume_skips_a_complete_run(tmp_path: Path) -> None:
    first = run(tmp_path, "trainer.max_steps=2", "trainer.val_check_interval=2")
    stamp = (tmp_path / "results.json").stat().st_mtime_ns
    again = run(tmp_path, "trainer.max_steps=2", "trainer.val_check_interval=2", "resume=true")
    assert again == first and (tmp_path / "results.json").stat().st_mtime_ns == stamp


def test_resume_continues_when_the_budget_grew(tmp_path: Path) -> None:
    run(tmp_path, "trainer.max_steps=2", "trainer.val_check_interval=2")
    cfg = compose_config(settings_with("trainer.max_steps=4", "trainer.val_check_interval=2", "resume=true"), tmp_path)
    assert complete_results(tmp_path / "results.json", cfg) is None
    assert train(cfg)["steps"] == 4
    rows = logged_rows(tmp_path)  # the first two steps' metrics and test result are still in metrics.csv
    assert [int(row["step"]) for row in rows if row["train/loss"]] == [0, 1, 2, 3]
    assert [int(row["step"]) for row in rows if row["test/mIoU"]] == [2, 4]


@pytest.mark.parametrize("first_budget", [2, 3])  # the last step validated (2) or not (3)
def test_grown_budget_logs_like_an_uninterrupted_run(tmp_path: Path, first_budget: int) -> None:
    """Continuing a finished run logs every training loss at the step and epoch an uninterrupted run logs it
    (with the default checkpoint interval: last.ckpt written at the end of the budget, after its validation)."""
    grown = (
        "trainer.max_steps=4",
        "trainer.val_check_interval=2",
        "callbacks.resume_checkpoint.every_n_train_steps=100",
    )
    run(tmp_path / "whole", *grown)
    run(tmp_path / "resumed", *grown, f"trainer.max_steps={first_budget}")
    run(tmp_path / "resumed", *grown, "resume=true")

    def losses(run_dir: Path) -> list[tuple[str, str, str]]:
        with open(run_dir / "csv" / "metrics.csv", newline="") as file:
            return [(row["step"], row["epoch"], row["train/loss"]) for row in csv.DictReader(file) if row["train/loss"]]

    assert losses(tmp_path / "resumed") == losses(tmp_path / "whole")


def test_resume_without_checkpoint_trains_from_scratch(tmp_path: Path) -> None:
    assert run(tmp_path, "trainer.max_steps=2", "trainer.val_check_interval=2", "resume=true")["steps"] == 2


# ---- resume at every step ---------------------------------------------------------------------------------
def per_step_methods() -> list[str]:
    """One method config per method class, leaving out the self-training ones (their driver runs whole fits)."""
    by_class: dict[str, str] = {}
    for path in sorted((Path(CONFIG_DIR) / "method").glob("*.yaml")):
        method = compose_config([f"method={path.stem}"]).method
        if not method.get("driver"):
            by_class.setdefault(method._target_, path.stem)
    return sorted(by_class.values())


EVERY_STEP_MAX = 7
EVERY_STEP = [
    f"trainer.max_steps={EVERY_STEP_MAX}",
    "trainer.val_check_interval=2",  # validation at steps 2, 4, 6; epoch ends at steps 3 and 6
    "trainer.deterministic=true",
    "callbacks.prediction_overlays=null",
    "labeled_ratio=0.3",  # 9 labeled images: 2 batches of 4 per pass, so the labeled loader cycles mid-epoch
    "data.batch_size_unlabeled=6",  # 20 unlabeled images: 3 batches per pass, the epoch
]
EVERY_STEP_METHOD = {  # small networks; cps_rg's three stages within the run's three epochs
    "u2pl": ["method.queue_size=64", "method.background_queue_size=96", "method.num_queries=16",
             "method.num_negatives=8", "method.rep_dim=16"],  # small queues: a checkpoint every step stays small
    "cps_rg": ["model=unet", "partial_labels=points", "method.cps_start_epoch=1", "method.grow_start_epoch=2",
               "method.growing.threshold=0.0", "method.growing.neighbourhood=5", "method.inference=first"],
}  # fmt: skip
NARROW = ["model.channels=[4,8,16,32,64]"]
FAST_EVERY_STEP = {("supervised", "SIGTERM"), ("mean_teacher", "SIGTERM"), ("mean_teacher", "crash")}
EVERY_STEP_CASES = [
    pytest.param(method, how, marks=[] if (method, how) in FAST_EVERY_STEP else [pytest.mark.slow])
    for method in per_step_methods()
    for how in ("SIGTERM", "crash")
    if how == "SIGTERM" or method in ("supervised", "mean_teacher")
]


def all_rows(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "csv" / "metrics.csv", newline="") as file:
        return list(csv.DictReader(file))


@pytest.mark.parametrize(("method", "how"), EVERY_STEP_CASES)
def test_resumed_at_every_step_equals_uninterrupted_run(method: str, how: str, tmp_path: Path) -> None:
    """Stopped after every step in turn (the first, middle and last batch of each epoch, before and after
    validation) and resumed each time, a run ends bitwise equal to an uninterrupted one, epochs included.

    ``SIGTERM`` saves ``last.ckpt`` at the stop; ``crash`` is a process killed without a handler, after the
    periodic checkpoint of the step before (``every_n_train_steps=1``)."""
    settings = [*EVERY_STEP, f"method={method}", *EVERY_STEP_METHOD.get(method, NARROW)]
    if how == "crash":
        settings.append("callbacks.resume_checkpoint.every_n_train_steps=1")
    expected = train(compose_config(settings, tmp_path / "straight"))
    run_dir = tmp_path / "stopped"
    for step in range(1, EVERY_STEP_MAX):
        stop_at = step + 1 if how == "crash" else step
        stopper = [f"+callbacks.stop._target_={__name__}.StopAtStep", f"+callbacks.stop.step={stop_at}"]
        with pytest.raises(RuntimeError if how == "crash" else SystemExit):
            train(compose_config([*settings, *stopper, f"+callbacks.stop.how={how}", "resume=true"], run_dir))
        assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == step
    resumed = train(compose_config([*settings, "resume=true"], run_dir))
    assert resumed["steps"] == expected["steps"] == EVERY_STEP_MAX
    assert resumed["metrics"] == expected["metrics"]
    assert resumed["best_val"] == expected["best_val"]
    final, reference = weights(run_dir), weights(tmp_path / "straight")
    differing = [name for name in reference if not bitwise_equal(final[name], reference[name])]
    assert final.keys() == reference.keys() and not differing, f"{len(differing)} of {len(reference)} differ"
    # every logged value is the same, epoch included; a SIGTERM stop loses only the training rows of its step:
    # the step's own and, stopped at an epoch's last batch, the epoch's aggregated training values (cps_rg's
    # train/labeled_share), whose row Lightning writes after the step's checkpoint
    resumed_rows, straight_rows = all_rows(run_dir), all_rows(tmp_path / "straight")
    missing = [row for row in straight_rows if row not in resumed_rows]
    assert resumed_rows == [row for row in straight_rows if row not in missing]
    lost = {step - 1 for step in range(1, EVERY_STEP_MAX)} if how == "SIGTERM" else set()

    def training_row(row: dict[str, str]) -> bool:
        return all(key.startswith("train/") for key, value in row.items() if value and key not in ("epoch", "step"))

    assert all(training_row(row) and int(row["step"]) in lost for row in missing), [
        {k: v for k, v in row.items() if v} for row in missing
    ]


# ---- a finished run is never overwritten; a moved run resumes; no two checkpoints of one step --------------
def run_dir_contents(run_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        (["resume=true", "labeled_ratio=0.3"], "labeled_ratio: 0.1 -> 0.3"),
        (["resume=true", "seed=4"], "seed: 0 -> 4"),
        (["optimizer.lr=0.5"], "already holds another run"),
    ],
)
def test_a_refused_rerun_into_a_finished_run_writes_nothing(
    overrides: list[str], named: str, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from test_bad_input import run_cli

    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    run_dir = tmp_path / "run"
    code, err = run_cli(["callbacks.prediction_overlays=null"], run_dir, capsys)
    assert code == 0, err[-2000:]
    before = run_dir_contents(run_dir)
    assert ".hydra/overrides.yaml" in before and "results.json" in before
    code, err = run_cli(["callbacks.prediction_overlays=null", *overrides], run_dir, capsys)
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(lines) == 1 and named in lines[0], err[-2000:]
    assert run_dir_contents(run_dir) == before  # results.json, split.json, .hydra/ and the rest as they were


def test_a_moved_run_dir_resumes_with_its_own_checkpoints(tmp_path: Path) -> None:
    first = tmp_path / "first"
    stopper = [f"+callbacks.stop._target_={__name__}.StopAtStep", "+callbacks.stop.step=3"]
    stopper.append("+callbacks.stop.how=SIGTERM")
    with pytest.raises(SystemExit):
        run(first, "trainer.val_check_interval=1", *stopper)
    moved = tmp_path / "elsewhere" / "moved"
    moved.parent.mkdir()
    shutil.move(first, moved)
    results = run(moved, "trainer.val_check_interval=1", "resume=true")
    assert results["steps"] == MAX_STEPS
    assert results["checkpoint"].startswith("checkpoints/best-step") and (moved / results["checkpoint"]).is_file()


def test_resume_without_last_checkpoint_says_so_and_keeps_one_checkpoint_per_step(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    crash = [f"+callbacks.stop._target_={__name__}.StopAtStep", "+callbacks.stop.step=4", "+callbacks.stop.how=crash"]
    settings = ["trainer.val_check_interval=1", "callbacks.resume_checkpoint.every_n_train_steps=100"]
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(tmp_path, *settings, *crash)  # killed before the first last.ckpt, after best-step checkpoints
    assert not (tmp_path / "checkpoints" / "last.ckpt").exists() and list((tmp_path / "checkpoints").glob("best-*"))
    results = run(tmp_path, *settings, "resume=true")
    assert results["steps"] == MAX_STEPS
    said = [r.getMessage() for r in caplog.records if "no checkpoints/last.ckpt" in r.getMessage()]
    assert len(said) == 1 and "training again from step 0" in said[0], said
    names = sorted(p.name for p in (tmp_path / "checkpoints").glob("*.ckpt"))
    steps = [name for name in names if name.startswith("best-")]
    assert not [name for name in names if "-v" in name] and len(steps) == 1, names


def test_a_resumed_run_counts_the_training_time_of_the_whole_run(tmp_path: Path) -> None:
    stopper = [f"+callbacks.stop._target_={__name__}.StopAtStep", "+callbacks.stop.step=4"]
    stopper.append("+callbacks.stop.how=SIGTERM")
    with pytest.raises(SystemExit):
        run(tmp_path, *stopper)
    before = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["semiseg_train_seconds"]
    assert before > 0
    results = run(tmp_path, "resume=true")
    assert results["train_seconds"] >= round(before, 3)
