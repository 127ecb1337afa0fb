"""``python -m semiseg.evaluate``: reproduce a run's test metrics, evaluate other splits, predict a folder."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from hydra.core.global_hydra import GlobalHydra
from omegaconf import open_dict

import semiseg.evaluate as evaluate_app
from semiseg.callbacks import PALETTE
from semiseg.config import compose_config
from semiseg.train import train


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from conftest import compose_config as compose_train_config

    run_dir = tmp_path_factory.mktemp("run")
    train(compose_train_config(["trainer.max_steps=3"], run_dir))
    return run_dir


def evaluate(*overrides: str, output_dir: Path) -> dict:
    cfg = compose_config(["num_workers=0", "verbose=false", *overrides], config_name="evaluate")
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
    # per_image.csv as the run wrote it: same images, same per-image scores
    assert (tmp_path / "per_image.csv").read_text() == (trained_run / "per_image.csv").read_text()


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
        # the overlay: the image as it is (no contrast stretch) where nothing is predicted, a legend bar below
        picture = cv2.cvtColor(cv2.imread(str(tmp_path / "overlays" / f"{stem}.png")), cv2.COLOR_BGR2RGB)
        original = cv2.cvtColor(cv2.imread(str(images / f"{stem}.png")), cv2.COLOR_BGR2RGB)
        assert picture.shape[1] == size[1] and picture.shape[0] > size[0]
        background = mask == 0
        assert np.array_equal(picture[: size[0]][background], original[background])
        legend_bar = picture[size[0] :].reshape(-1, 3)
        for index in range(1, 5):  # every defect class's colour is in the legend
            assert (legend_bar == PALETTE[index]).all(axis=1).any(), index
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


@pytest.mark.parametrize(
    ("content", "says"),
    [(b"garbage, not a checkpoint", "not a PyTorch checkpoint"), (b"PK\x03\x04 truncated", "damaged")],
)
def test_a_garbage_checkpoint_is_not_advised_to_be_trusted(tmp_path: Path, capsys, content: bytes, says: str) -> None:
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(content)
    with pytest.raises(SystemExit) as done:
        evaluate(f"ckpt={bad}", output_dir=tmp_path / "out")
    err = capsys.readouterr().err
    assert done.value.code == 2 and says in err and "trust_checkpoint" not in err, err


def test_a_checkpoint_with_pickled_objects_may_be_trusted(trained_run: Path, tmp_path: Path, capsys) -> None:
    import torch

    checkpoint = torch.load(trained_run / "checkpoints" / "last.ckpt", weights_only=False)
    checkpoint["extra"] = Path("an object")  # a class beyond tensors and plain containers
    torch.save(checkpoint, tmp_path / "objects.ckpt")
    with pytest.raises(SystemExit):
        evaluate(f"ckpt={tmp_path / 'objects.ckpt'}", output_dir=tmp_path / "out")
    assert "add trust_checkpoint=true" in capsys.readouterr().err


def test_a_missing_input_dir_is_called_missing(trained_run: Path, tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as done:
        evaluate(
            f"ckpt={trained_run / 'checkpoints' / 'last.ckpt'}", f"input_dir={tmp_path / 'nowhere'}",
            output_dir=tmp_path / "out",
        )  # fmt: skip
    err = capsys.readouterr().err
    assert done.value.code == 2 and f"input_dir={tmp_path / 'nowhere'}: no such folder" in err, err


def test_a_checkpoint_path_with_equals_signs_needs_no_quotes(trained_run: Path, tmp_path: Path, monkeypatch) -> None:
    import shutil

    job = tmp_path / "cmp" / "labeled_ratio=0.1,method=supervised,seed=0"  # a sweep job's folder name
    shutil.copytree(trained_run, job)
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    out = tmp_path / "out=1"
    argv = ["semiseg.evaluate", f"ckpt={job / 'checkpoints' / 'last.ckpt'}", "num_workers=0", "verbose=false"]
    monkeypatch.setattr(sys, "argv", [*argv, f"hydra.run.dir={out}"])
    GlobalHydra.instance().clear()
    evaluate_app._task_started = False
    evaluate_app.cli()
    GlobalHydra.instance().clear()
    result = json.loads((out / "evaluation.json").read_text())
    assert result["ckpt"] == str(job / "checkpoints" / "last.ckpt") and result["metrics"]["test/mIoU"] is not None


def test_training_prediction_grids_are_readable(make_cfg) -> None:
    """predictions/step_*.png: panels enlarged to min_side, titled image / ground truth / prediction, with the
    class legend (was 128 x 192 px, two untitled panels)."""
    cfg = make_cfg(
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        "callbacks.prediction_overlays.every_n_validations=1",
        "callbacks.prediction_overlays.num_images=2",
        "callbacks.prediction_overlays.min_side=96",
    )
    train(cfg)
    grids = sorted((Path(cfg.paths.output_dir) / "predictions").glob("step_*.png"))
    assert grids, "no prediction grid written"
    grid = cv2.cvtColor(cv2.imread(str(grids[-1])), cv2.COLOR_BGR2RGB)
    side = 32 * 3  # the tiny test images are 32 x 32: enlarged by 3 to reach 96
    assert cfg.dataset.image_size == [32, 32]
    assert grid.shape[1] == 3 * side and grid.shape[0] > 2 * side  # three columns, two rows, title and legend
    title_height = 24
    assert (grid[:title_height] == 255).any(), "the column titles are drawn in white"
    legend_rows = grid[title_height + 2 * side :].reshape(-1, 3)  # one or more legend bars
    assert all((legend_rows == PALETTE[i]).all(axis=1).any() for i in range(1, len(cfg.dataset.class_names)))
