"""What the terminal shows: progress over the step budget, one line every N steps in a log, no third-party noise."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import FAST
from semiseg.console import StepProgressLog, format_duration
from semiseg.train import train

ROOT = Path(__file__).resolve().parents[1]


def test_durations_read_as_hours_minutes_seconds() -> None:
    assert [format_duration(s) for s in (4.2, 65, 3725)] == ["4s", "1m05s", "1h02m05s"]


def test_a_log_gets_a_progress_line_every_n_steps(make_cfg, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="semiseg.progress")
    train(make_cfg("trainer.max_steps=5", "callbacks.progress_bar.log_every_n_steps=2"))
    lines = [r.getMessage() for r in caplog.records if r.name == "semiseg.progress"]
    assert [line.split("  ")[0] for line in lines] == ["step 2/5 (40.0%)", "step 4/5 (80.0%)", "step 5/5 (100.0%)"]
    assert all("steps/s" in line or "s/step" in line for line in lines), lines
    assert "ETA" in lines[0] and "train/loss=" in lines[0], lines


def test_a_terminal_bar_counts_steps_of_the_budget(make_cfg, capsys: pytest.CaptureFixture) -> None:
    train(make_cfg("trainer.max_steps=3", "+callbacks.progress_bar.is_terminal=true"))
    captured = capsys.readouterr()
    shown = captured.out + captured.err  # Lightning's bars write to stdout
    assert "step (epoch " in shown and "3/3 [" in shown, shown[-1500:]
    assert "Epoch " not in shown  # Lightning's per-epoch bar (Epoch 4/-2 with max_epochs=-1) is gone


def test_the_log_progress_is_off_when_disabled() -> None:
    bar = StepProgressLog(every_n_steps=1)
    bar.disable()
    assert not bar.is_enabled


def test_a_run_into_a_log_file_shows_no_redraws_and_no_third_party_noise(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "semiseg.train", *FAST, "trainer.max_steps=4", "trainer.enable_model_summary=false",
         "callbacks.progress_bar.log_every_n_steps=2", f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=900,
        env={**{k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}, "PYTHONPATH": str(ROOT / "src")},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    output = done.stdout + done.stderr
    assert "\r" not in output and "\x1b[A" not in output  # no bar redraws in a file
    assert [line.split("] - ")[-1].split("  ")[0] for line in output.splitlines() if "semiseg.progress" in line] == [
        "step 2/4 (50.0%)",
        "step 4/4 (100.0%)",
    ]
    for noise in ("Tip:", "deprecated", "is smaller than the logging interval", "multiple `ModelCheckpoint`"):
        assert noise not in output, noise
