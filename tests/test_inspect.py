"""``python -m semiseg.data.inspect``: summary figures against the fake data, the PNG grid, bad options."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data.make_fake_datasets import make_fake_folder
from semiseg.config import compose_config
from semiseg.data.datasets.folder import ImageFolder
from semiseg.data.datasets.synthetic import SyntheticDefects
from semiseg.data.inspect import format_summary, pick_examples, summarize
from semiseg.data.inspect import inspect as run_inspect
from semiseg.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def inspect_config(*overrides: str):
    return compose_config(overrides, config_name="inspect")


def test_sizes_of_the_synthetic_set() -> None:
    """Generated images have no file header: their size is the size they are drawn at (was "0 distinct")."""
    dataset = SyntheticDefects(num_images=12, image_size=(24, 40))
    summary = summarize(dataset, max_images=2)
    assert summary["image_sizes"]["most_common"] == [{"width": 40, "height": 24, "images": 12}]
    assert "image sizes: 1 distinct, width 40-40, height 24-24" in format_summary(summary)


def test_summary_counts_and_pixel_shares(tmp_path: Path) -> None:
    root = make_fake_folder(tmp_path / "mine", labeled=9, unlabeled=2)
    dataset = ImageFolder(root, mask_values={0: 0, 255: 1})
    summary = summarize(dataset)
    masks = [np.asarray(Image.open(p)) > 0 for p in sorted((root / "masks").glob("*.png"))]
    assert summary["pools"] == {"train": {"images": 9, "with_defect": 6}, "unlabeled": {"images": 2, "with_defect": 0}}
    assert summary["classes"]["defect"]["images"] == sum(m.any() for m in masks) == 6
    share = sum(m.sum() for m in masks) / sum(m.size for m in masks)
    assert summary["classes"]["defect"]["pixel_share"] == pytest.approx(share)
    assert summary["image_sizes"]["most_common"] == [{"width": 36, "height": 36, "images": 11}]
    assert len(summary["channel_mean"]) == 3 and all(0 < v < 1 for v in summary["channel_mean"])
    capped = summarize(dataset, max_images=3)
    assert capped["images_examined"] == 3 and capped["images_labeled"] == 9


def test_examples_cover_every_class_and_a_defect_free_image(fake_data_dir: Path) -> None:
    from semiseg.data.datasets.neu import NEUSeg

    dataset = NEUSeg(fake_data_dir / "NEU_data")
    picked = pick_examples(dataset, 4, seed=0)
    assert len(picked) == 4 and {c for s in picked for c in s.classes} == {1, 2, 3}
    folder = ImageFolder(fake_data_dir / "Folder_data", mask_values={0: 0, 255: 1})
    assert any(not s.classes for s in pick_examples(folder, 3, seed=0))


@pytest.mark.parametrize("name", ["neu", "dagm", "kosdd2", "folder", "mtiles"])
def test_inspect_writes_summary_and_grid(name: str, fake_data_dir: Path, tmp_path: Path, capsys) -> None:
    cfg = inspect_config(
        f"dataset={name}",
        f"paths.data_dir={fake_data_dir}",
        f"paths.cache_dir={tmp_path / 'cache'}",
        f"inspect.output_dir={tmp_path / 'out'}",
        "inspect.num_examples=6",
        "inspect.columns=3",
    )
    summary = run_inspect(cfg)
    assert json.loads((tmp_path / "out" / "summary.json").read_text()) == summary
    grid = Image.open(tmp_path / "out" / f"examples-{name}.png")
    assert grid.size == (3 * 320, 2 * 340 + 60)
    assert f"dataset {name}" in capsys.readouterr().out
    assert set(summary["classes"]) == set(cfg.dataset.class_names)


def test_bad_options(fake_data_dir: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    cfg = inspect_config("dataset=folder", f"paths.data_dir={fake_data_dir}", "inspect.num_examples=0")
    with pytest.raises(SystemExit) as exit_info:
        run_inspect(cfg)
    assert exit_info.value.code == 2 and "inspect.num_examples=0 must be a positive integer" in capsys.readouterr().err
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    cfg = inspect_config("dataset=folder", f"paths.data_dir={fake_data_dir}", "inspect.max_images=-3")
    with pytest.raises(ConfigError, match=r"inspect.max_images=-3"):
        run_inspect(cfg)


def test_command_line(fake_data_dir: Path, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "SEMISEG_DATA_DIR": str(fake_data_dir)}
    done = subprocess.run(
        [sys.executable, "-m", "semiseg.data.inspect", "dataset=kosdd2", f"hydra.run.dir={tmp_path}",
         f"paths.cache_dir={tmp_path / 'cache'}"],
        env=env, capture_output=True, text=True, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "train" in done.stdout and (tmp_path / "examples-kosdd2.png").is_file()
    missing = subprocess.run(
        [sys.executable, "-m", "semiseg.data.inspect", "dataset=neu", f"paths.data_dir={tmp_path / 'none'}",
         f"hydra.run.dir={tmp_path / 'run2'}"],
        env=env, capture_output=True, text=True, cwd=tmp_path,
    )  # fmt: skip
    assert missing.returncode == 2 and "dataset 'neu' not found" in missing.stderr
