"""Writes are atomic: a failed save (full disk, no permission) gives a clear error and leaves the previous
file intact; a run never writes into another run's directory."""

from __future__ import annotations

import errno
import json
import os
import shutil
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
    with pytest.raises(WriteError, match="no space left writing") as error:
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


def torch_save_on_a_full_disk(after: int):
    """``torch.save`` that works ``after`` times, then writes half a file and fails as it does on a full disk
    (a ``RuntimeError`` from its zip writer, not an ``OSError``)."""
    real_save, calls = torch.save, []

    def save(obj, target, *args, **kwargs):
        calls.append(target)
        if len(calls) <= after:
            return real_save(obj, target, *args, **kwargs)
        Path(target).write_bytes(b"PK\x03\x04 half a checkpoint")
        raise RuntimeError(
            "[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed writing file data/7: "
            "file write failed"
        )

    return save


def test_a_full_disk_during_a_run_gives_one_line_and_keeps_the_previous_checkpoint(
    make_cfg, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = make_cfg("trainer.max_steps=3", "callbacks.prediction_overlays=null")
    run_dir = Path(cfg.paths.output_dir)
    monkeypatch.setattr(torch, "save", torch_save_on_a_full_disk(after=1))
    monkeypatch.setattr("shutil.disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9, 0))
    with pytest.raises(SystemExit) as done:
        train(cfg)
    monkeypatch.undo()
    assert done.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: no space left writing ") and ".ckpt" in err[0], err
    left = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert left == ["best-step1.ckpt"], left  # no temporary file; the previous checkpoint is intact
    assert torch.load(run_dir / "checkpoints" / "best-step1.ckpt", weights_only=True)["global_step"] == 1


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
