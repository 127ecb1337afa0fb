"""The GPU trainer paths (``trainer=gpu``, ``trainer=ddp`` over NCCL): run when CUDA devices are there, skipped
otherwise (``@pytest.mark.gpu``; see ``conftest.pytest_runtest_setup``), so the same suite checks a GPU machine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import FAST
from semiseg.train import train

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.gpu(min_gpus=1)
def test_trainer_gpu_trains_on_the_gpu_in_bf16(make_cfg, probe) -> None:
    results = train(make_cfg("trainer=gpu", "trainer.max_steps=2", "trainer.val_check_interval=1"))
    assert probe.devices == {"cuda"}, "the module must train on the GPU"
    assert set(probe.output_dtypes) == {torch.bfloat16}  # trainer=gpu trains in bf16-mixed
    assert results["steps"] == 2 and 0.0 <= results["metrics"]["test/pixel_acc"] <= 1.0


@pytest.mark.gpu(min_gpus=1)
def test_trainer_ddp_on_gpus_writes_one_result(tmp_path: Path) -> None:
    devices = min(2, torch.cuda.device_count())
    run_dir = tmp_path / "run"
    overrides = ["trainer=ddp", "trainer.accelerator=gpu", f"trainer.devices={devices}", f"hydra.run.dir={run_dir}"]
    command = [sys.executable, "-m", "semiseg.train", *FAST, *overrides]
    environment = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run(command, cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=900)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    assert f"MEMBER: {devices}/{devices}" in output
    results = json.loads((run_dir / "results.json").read_text())
    assert results["steps"] == 2 and 0.0 <= results["metrics"]["test/pixel_acc"] <= 1.0
