"""Multiruns: job folders named by overrides, the manifest, the basic and the joblib launcher, and
``resume=true`` skipping finished jobs (tiny budgets on synthetic data)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import FAST
from semiseg.errors import ConfigError
from semiseg.sweeps import job_dirname, resolve_num_threads

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    *[o for o in FAST if not o.startswith("trainer.max_steps")],
    "trainer.max_steps=2",
    "model.channels=[4,8,16,32,64]",
    "callbacks.prediction_overlays=null",
]
JOBS = {"labeled_ratio=0.3,method=cps", "labeled_ratio=0.3,method=supervised",
        "labeled_ratio=0.5,method=cps", "labeled_ratio=0.5,method=supervised"}  # fmt: skip


def multirun(sweep_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "semiseg.train", "-m", *TINY, *overrides, f"hydra.sweep.dir={sweep_dir}"],
        cwd=sweep_dir.parent, env=environment, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def manifest(sweep_dir: Path) -> dict:
    return json.loads((sweep_dir / "manifest.json").read_text())


def test_basic_launcher_manifest_and_resume(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "sweep"
    multirun(sweep_dir, "method=supervised,cps", "labeled_ratio=0.3,0.5")
    assert {p.name for p in sweep_dir.iterdir() if (p / "results.json").is_file()} == JOBS
    first = manifest(sweep_dir)
    assert first["status"] == "finished" and first["counts"] == {"trained": 4}
    assert first["launcher"] == "BasicLauncher"
    assert {job["dir"] for job in first["jobs"]} == JOBS
    for job in first["jobs"]:
        results = json.loads((sweep_dir / job["dir"] / "results.json").read_text())
        assert job["test/mIoU"] == results["metrics"]["test/mIoU"] and job["steps"] == 2
        assert f"method={results['method']}" in job["overrides"]
    assert (sweep_dir / "manifest.csv").read_text().count("\n") == 5

    # one job lost its results (killed after training): resume redoes only that one, from its last.ckpt
    lost = sweep_dir / "labeled_ratio=0.5,method=cps"
    (lost / "results.json").unlink()
    kept = sweep_dir / "labeled_ratio=0.3,method=supervised" / "results.json"
    stamp = kept.stat().st_mtime_ns
    done = multirun(sweep_dir, "method=supervised,cps", "labeled_ratio=0.3,0.5", "resume=true")
    second = manifest(sweep_dir)
    assert second["counts"] == {"skipped": 3, "resumed": 1}
    assert {job["dir"] for job in second["jobs"] if job["status"] == "resumed"} == {lost.name}
    assert (lost / "results.json").is_file() and kept.stat().st_mtime_ns == stamp
    assert "continuing from" in done.stderr + done.stdout or "continuing from" in (lost / "train.log").read_text()


@pytest.mark.slow  # two loky workers each import torch: ~30 s on an idle 2-core machine
def test_joblib_launcher_runs_jobs_in_parallel_with_divided_threads(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "sweep"
    multirun(sweep_dir, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "seed=0,1", "labeled_ratio=0.3,0.5")
    record = manifest(sweep_dir)
    assert record["launcher"] == "JoblibLauncher" and record["counts"] == {"trained": 4}
    expected_threads = max(1, len(os.sched_getaffinity(0)) // 2)
    for job in record["jobs"]:
        job_dir = sweep_dir / job["dir"]
        assert (job_dir / "results.json").is_file()
        assert f"torch threads: {expected_threads}" in (job_dir / "train.log").read_text()
    assert {job["dir"] for job in record["jobs"]} == {
        "labeled_ratio=0.3,seed=0", "labeled_ratio=0.3,seed=1", "labeled_ratio=0.5,seed=0", "labeled_ratio=0.5,seed=1"
    }  # fmt: skip


@pytest.mark.parametrize(
    ("override_dirname", "name"),
    [("", "default"), ("method=cps,seed=1", "method=cps,seed=1"), ("split_file=/a/b.json", "split_file=-a-b.json")],
)
def test_job_dirname(override_dirname: str, name: str) -> None:
    assert job_dirname(override_dirname) == name


def test_num_threads() -> None:
    assert resolve_num_threads(3) == 3
    assert resolve_num_threads("auto") == len(os.sched_getaffinity(0))  # no multirun: all cores
    with pytest.raises(ConfigError, match="num_threads=0"):
        resolve_num_threads(0)


@pytest.mark.parametrize(
    ("launcher", "target"),
    [("joblib", "JoblibLauncher"), ("submitit_local", "LocalLauncher"), ("submitit_slurm", "SlurmLauncher")],
)
def test_launcher_configs_compose(launcher: str, target: str) -> None:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from semiseg.config import CONFIG_DIR

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", [f"hydra/launcher={launcher}", "trainer=ddp"], return_hydra_config=True)
    assert cfg.hydra.launcher._target_.endswith(target)
    if launcher == "submitit_slurm":
        assert cfg.hydra.launcher.tasks_per_node == cfg.trainer.devices == 2
        assert cfg.hydra.launcher.partition is None and cfg.hydra.launcher.timeout_min > 0
