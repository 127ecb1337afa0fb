"""``python -m semiseg.evaluate``: reproduce a run's test metrics, evaluate other splits, predict a folder."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import open_dict

import semiseg.evaluate as evaluate_app
from semiseg.config import CONFIG_DIR
from semiseg.train import train


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from conftest import compose_config

    run_dir = tmp_path_factory.mktemp("run")
    train(compose_config(["trainer.max_steps=3"], run_dir))
    return run_dir


def evaluate(*overrides: str, output_dir: Path) -> dict:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="evaluate", overrides=["num_workers=0", "verbose=false", *overrides])
    with open_dict(cfg):
        cfg.output_dir = str(output_dir)
    return evaluate_app.evaluate(cfg)


def test_reproduces_the_runs_test_metrics(trained_run: Path, tmp_path: Path) -> None:
    results = json.loads((trained_run / "results.json").read_text())
    checkpoint = trained_run / results["checkpoint"]
    evaluation = evaluate(f"ckpt={checkpoint}", output_dir=tmp_path)
    assert evaluation["num_images"] == results["split"]["test"]
    for key in ("test/mIoU", "test/mDice", "test/pixel_acc"):
        assert evaluation["metrics"][key] == pytest.approx(results["metrics"][key], abs=1e-6)
    assert json.loads((tmp_path / "evaluation.json").read_text())["metrics"] == evaluation["metrics"]


@pytest.mark.parametrize(("split", "part"), [("val", "val"), ("labeled", "labeled"), ("unlabeled", "unlabeled")])
def test_other_splits(trained_run: Path, tmp_path: Path, split: str, part: str) -> None:
    results = json.loads((trained_run / "results.json").read_text())
    evaluation = evaluate(f"ckpt={trained_run / 'checkpoints' / 'last.ckpt'}", f"split={split}", output_dir=tmp_path)
    assert evaluation["num_images"] == results["split"][part]


def test_predicts_a_folder_at_each_images_size(trained_run: Path, tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    sizes = {"a": (40, 56), "b": (64, 64)}
    for stem, (height, width) in sizes.items():
        cv2.imwrite(str(images / f"{stem}.png"), rng.integers(0, 255, (height, width, 3), dtype=np.uint8))
    evaluation = evaluate(
        f"ckpt={trained_run / 'checkpoints' / 'last.ckpt'}", f"input_dir={images}", "overlay=true", output_dir=tmp_path
    )
    assert evaluation["num_images"] == 2
    for stem, size in sizes.items():
        mask = cv2.imread(str(tmp_path / "masks" / f"{stem}.png"), cv2.IMREAD_UNCHANGED)
        assert mask.shape == size and mask.max() < 5
        assert (tmp_path / "overlays" / f"{stem}.png").is_file()
    assert sum(evaluation["predicted_pixel_share"].values()) == pytest.approx(1.0)


def test_other_classes_are_refused(trained_run: Path, tmp_path: Path, fake_data_dir: Path, capsys) -> None:
    with pytest.raises(SystemExit) as done:
        evaluate(
            f"ckpt={trained_run / 'checkpoints' / 'last.ckpt'}", "dataset=mtiles", f"paths.data_dir={fake_data_dir}",
            output_dir=tmp_path,
        )  # fmt: skip
    assert done.value.code == 2 and "has classes" in capsys.readouterr().err


def test_missing_checkpoint_on_the_command_line(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    monkeypatch.setattr(
        sys, "argv", ["semiseg.evaluate", f"ckpt={tmp_path / 'none.ckpt'}", f"hydra.run.dir={tmp_path}"]
    )
    GlobalHydra.instance().clear()
    with pytest.raises(SystemExit) as done:
        evaluate_app.cli()
    GlobalHydra.instance().clear()
    assert done.value.code == 2 and "no such checkpoint file" in capsys.readouterr().err
