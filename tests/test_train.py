"""The training app end to end: through Hydra's compose API, as a subprocess, and on bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import FAST, compose_config
from semiseg.train import train

RESULT_KEYS = {
    "method", "dataset", "model", "labeled_ratio", "seed", "split_seed", "num_params", "num_params_train",
    "split", "metrics", "best_val", "steps", "train_seconds", "checkpoint", "config",
}  # fmt: skip
ROOT = Path(__file__).resolve().parents[1]


def check_results(run_dir: Path, steps: int) -> dict:
    results = json.loads((run_dir / "results.json").read_text())
    assert set(results) == RESULT_KEYS
    assert set(results["split"]) == {"labeled", "unlabeled", "val", "test"}
    for key in ("test/mIoU", "test/mDice", "test/mIoU_all", "test/pixel_acc"):
        assert 0.0 <= results["metrics"][key] <= 1.0
    assert any(key.startswith("test/IoU/") for key in results["metrics"])
    assert results["steps"] == steps
    assert (run_dir / results["config"]).is_file() and (run_dir / "split.json").is_file()
    return results


def test_fit_test_and_results_through_compose(make_cfg, tmp_path: Path) -> None:
    cfg = make_cfg()
    results = train(cfg)
    run_dir = Path(cfg.paths.output_dir)
    assert results == check_results(run_dir, steps=2)
    assert results["best_val"]["metric"] == "val/mIoU" and results["best_val"]["step"] in (1, 2)
    assert (run_dir / results["checkpoint"]).is_file()
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert results["num_params"] == results["num_params_train"] > 0
    assert (run_dir / "csv" / "metrics.csv").is_file()


def test_fast_dev_run_through_compose(make_cfg) -> None:
    results = train(make_cfg("trainer.fast_dev_run=true"))
    assert results["steps"] == 1 and results["checkpoint"] is None


def test_same_seed_same_metrics(tmp_path: Path) -> None:
    first = train(compose_config(["trainer.deterministic=true"], tmp_path / "a"))
    second = train(compose_config(["trainer.deterministic=true"], tmp_path / "b"))
    assert first["metrics"] == second["metrics"]


def run_app(*overrides: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": str(ROOT / "src"), **(env or {})}
    environment.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run(
        [sys.executable, "-m", "semiseg.train", *overrides],
        cwd=cwd, env=environment, capture_output=True, text=True, timeout=600,
    )  # fmt: skip


def test_app_as_a_subprocess(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    done = run_app(*FAST, "trainer.fast_dev_run=true", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    check_results(run_dir, steps=1)
    assert (run_dir / ".hydra" / "config.yaml").is_file()


@pytest.mark.parametrize(
    ("overrides", "culprit"),
    [
        (["labeled_ratio=0"], "labeled_ratio=0"),
        (["labeled_ratio=1.5"], "labeled_ratio=1.5"),
        (["labeled_ratio=abc"], "labeled_ratio='abc'"),
        (["dataset=mtiles", "paths.data_dir=/nonexistent"], "/nonexistent/MTiles_data"),
        (["split_file=/nonexistent/split.json"], "split_file=/nonexistent/split.json"),
        (["dataset.image_size=[30,30]"], "dataset.image_size=[30,30]"),
        (["method.no_such_option=1"], "no_such_option"),
    ],
)
def test_bad_input_gives_one_line_and_exit_code_2(overrides: list[str], culprit: str, tmp_path: Path) -> None:
    plus = ["+" + o if o.startswith("method.no_such") else o for o in overrides]
    done = run_app(*FAST, *plus, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert done.returncode == 2, done.stderr[-2000:]
    lines = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and culprit in lines[0], done.stderr[-2000:]
    assert "Traceback" not in done.stderr


def test_split_file_naming_unknown_images(tmp_path: Path) -> None:
    bad = tmp_path / "split.json"
    bad.write_text(json.dumps({"labeled": ["nope"], "unlabeled": [], "val": [], "test": []}))
    done = run_app(*FAST, f"split_file={bad}", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert done.returncode == 2 and "image 'nope'" in done.stderr


def test_split_file_is_reused(make_cfg, tmp_path: Path) -> None:
    first = make_cfg("trainer.fast_dev_run=true")
    train(first)
    split_path = Path(first.paths.output_dir) / "split.json"
    second = compose_config(
        ["trainer.fast_dev_run=true", "split_seed=7", f"split_file={split_path}"], tmp_path / "again"
    )
    train(second)
    assert (Path(second.paths.output_dir) / "split.json").read_text() == split_path.read_text()


def test_mtiles_on_fake_layout(fake_data_dir: Path, make_cfg) -> None:
    cfg = make_cfg(
        "dataset=mtiles", f"paths.data_dir={fake_data_dir}", "dataset.image_size=[32,32]", "labeled_ratio=0.3"
    )
    results = train(cfg)
    assert results["dataset"] == "mtiles" and "test/IoU/Blowhole" in results["metrics"]
    assert sum(results["split"].values()) == 20


def test_channels_last_and_bf16_run(make_cfg, probe) -> None:
    results = train(make_cfg("performance.channels_last=true", "trainer.precision=bf16-mixed", "optimizer.fused=true"))
    assert results["steps"] == 2 and results["metrics"]["test/mIoU"] is not None
    assert probe.channels_last and all(probe.channels_last), "every 4-D weight must be channels_last"
    assert probe.output_dtypes and set(probe.output_dtypes) == {torch.bfloat16}, "the forward runs under bf16 autocast"


def test_without_the_fast_paths_weights_stay_contiguous_and_float32(make_cfg, probe) -> None:
    train(make_cfg("performance.channels_last=false"))
    assert probe.channels_last and not any(probe.channels_last)
    assert set(probe.output_dtypes) == {torch.float32}


@pytest.mark.slow
def test_compile_runs(make_cfg, probe) -> None:
    from torch._dynamo.eval_frame import OptimizedModule

    results = train(make_cfg("performance.compile=true"))
    assert results["steps"] == 2
    assert OptimizedModule in probe.child_types, "the trainable network must be a torch.compile'd module"


def test_logger_none_runs(make_cfg, probe, tmp_path: Path) -> None:
    results = train(make_cfg("logger=none"))
    assert results["steps"] == 2 and probe.loggers == []
    written = {path.name for path in (tmp_path / "run").iterdir()}
    assert not written & {"csv", "tensorboard", "wandb", "lightning_logs"}, written


def test_no_validation_images_is_warned_about(make_cfg, caplog: pytest.LogCaptureFixture) -> None:
    results = train(make_cfg("dataset.val_fraction=0"))
    assert results["checkpoint"] is None
    assert any("no validation images" in r.getMessage() for r in caplog.records)
