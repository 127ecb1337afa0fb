"""Writes are atomic: a failed save (full disk, no permission) gives a clear error and leaves the previous
file intact; a run never writes into another run's directory."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
import torch

from semiseg.io import AtomicCheckpointIO, WriteError, atomic_write_json
from semiseg.train import train


def full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_results_write_failure_keeps_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "results.json"
    atomic_write_json(path, {"version": 1})
    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(WriteError, match="No space left on device") as error:
        atomic_write_json(path, {"version": 2})
    assert str(path) in str(error.value) and "unchanged" in str(error.value)
    assert json.loads(path.read_text()) == {"version": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]  # no temporary file left behind


@pytest.mark.parametrize("failing", ["torch.save", "os.replace"])
def test_checkpoint_write_failure_keeps_the_previous_checkpoint(
    failing: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1, "weights": torch.ones(3)}, path)
    module, name = failing.split(".")
    monkeypatch.setattr(torch if module == "torch" else os, name, full_disk)
    with pytest.raises(WriteError, match="previous checkpoint is unchanged"):
        io.save_checkpoint({"step": 2, "weights": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_a_run_does_not_write_into_another_runs_directory(make_cfg, capsys) -> None:
    cfg = make_cfg("trainer.max_steps=1")
    first = train(cfg)
    results = Path(cfg.paths.output_dir) / "results.json"
    before = results.read_text()
    with pytest.raises(SystemExit) as done:
        train(cfg)
    assert done.value.code == 2
    assert "already holds another run" in capsys.readouterr().err
    assert results.read_text() == before and json.loads(before)["steps"] == first["steps"]
