"""trainer=ddp on the CPU: two processes over gloo train, validate and test one run; results.json is written
once, with metrics synchronised over both ranks. Marked ``ddp`` (run with ``make test-ddp``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import FAST

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.ddp
@pytest.mark.parametrize("method", ["supervised", "cps"])
def test_ddp_two_cpu_processes_over_gloo(method: str, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    environment = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    overrides = [
        *FAST, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
        "trainer.strategy.process_group_backend=gloo", f"method={method}",
        "model.channels=[4,8,16,32,64]", "callbacks.prediction_overlays=null", "num_threads=1",
        f"hydra.run.dir={run_dir}",
    ]  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-m", "semiseg.train", *overrides],
        cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in output and "distributed_backend=gloo" in output
    results = json.loads((run_dir / "results.json").read_text())
    assert results["method"] == method and results["steps"] == 2
    assert 0.0 <= results["metrics"]["test/pixel_acc"] <= 1.0
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()


def test_sync_batchnorm_on_the_cpu_is_a_clear_error(make_cfg) -> None:
    from semiseg.errors import ConfigError
    from semiseg.train import check_config

    with pytest.raises(ConfigError, match=r"trainer\.sync_batchnorm=true needs GPUs"):
        check_config(make_cfg("trainer=ddp", "trainer.accelerator=cpu", "trainer.sync_batchnorm=true"))
