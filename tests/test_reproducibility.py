"""``seed`` changes initialisation and data order, never the split; ``split_seed`` changes the split."""

from __future__ import annotations

from pathlib import Path

import torch

from conftest import compose_config
from semiseg.train import train


def run(tmp_path: Path, name: str, *overrides: str) -> tuple[dict, str, dict]:
    cfg = compose_config(["trainer.max_steps=2", *overrides], tmp_path / name)
    results = train(cfg)
    output = Path(cfg.paths.output_dir)
    weights = torch.load(output / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    return results, (output / "split.json").read_text(), weights


def test_seed_changes_weights_not_split(tmp_path: Path) -> None:
    _, first_split, first_weights = run(tmp_path, "a", "seed=0")
    _, second_split, second_weights = run(tmp_path, "b", "seed=1")
    assert first_split == second_split
    assert any(not torch.equal(first_weights[key], second_weights[key]) for key in first_weights)


def test_split_seed_changes_split(tmp_path: Path) -> None:
    _, first_split, _ = run(tmp_path, "a", "split_seed=0", "trainer.max_steps=1")
    _, second_split, _ = run(tmp_path, "b", "split_seed=1", "trainer.max_steps=1")
    assert first_split != second_split
