"""Bad input, one case per row of the table in docs/errors.md: each gives exit code 2 and one line on stderr
that names the culprit (file, key or value), and no stack trace.

The command line runs in-process (``semiseg.train.cli`` with ``sys.argv``), as a user would type it; one case
also runs as a real subprocess.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from hydra.core.global_hydra import GlobalHydra

import semiseg.train as train_app
from conftest import FAST
from semiseg.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
Setup = Callable[[Path], list[str]]


def fake_mtiles(tmp_path: Path, fake_data_dir: Path) -> Path:
    """A private copy of the fake Magnetic Tiles data that a case may damage; returns its data dir."""
    shutil.copytree(fake_data_dir / "MTiles_data", tmp_path / "data" / "MTiles_data")
    return tmp_path / "data"


def first_pair(data_dir: Path) -> tuple[Path, Path]:
    image = sorted((data_dir / "MTiles_data" / "MT_Crack" / "Imgs").glob("*.jpg"))[0]
    return image, image.with_suffix(".png")


def mtiles(data_dir: Path) -> list[str]:
    return ["dataset=mtiles", f"paths.data_dir={data_dir}", "dataset.image_size=[32,32]", "labeled_ratio=0.5"]


def missing_mask(tmp_path: Path, fake: Path) -> tuple[list[str], str]:
    data_dir = fake_mtiles(tmp_path, fake)
    image, mask = first_pair(data_dir)
    mask.unlink()
    return mtiles(data_dir), f"{image}: image has no mask"


def orphan_mask(tmp_path: Path, fake: Path) -> tuple[list[str], str]:
    data_dir = fake_mtiles(tmp_path, fake)
    image, mask = first_pair(data_dir)
    image.unlink()
    return mtiles(data_dir), f"{mask}: mask has no image"


def unreadable_image(tmp_path: Path, fake: Path) -> tuple[list[str], str]:
    data_dir = fake_mtiles(tmp_path, fake)
    for image in (data_dir / "MTiles_data").rglob("*.jpg"):
        image.write_bytes(b"not a jpeg")
    return mtiles(data_dir), "cannot read this image file"


def size_mismatch(tmp_path: Path, fake: Path) -> tuple[list[str], str]:
    data_dir = fake_mtiles(tmp_path, fake)
    for mask in (data_dir / "MTiles_data").rglob("*.png"):
        cv2.imwrite(str(mask), np.zeros((7, 9), np.uint8))
    return mtiles(data_dir), "mask is 9x7 but its image"


def missing_class_folder(tmp_path: Path, fake: Path) -> tuple[list[str], str]:
    data_dir = fake_mtiles(tmp_path, fake)
    shutil.rmtree(data_dir / "MTiles_data" / "MT_Fray")
    return mtiles(data_dir), "MT_Fray/Imgs: class folder missing"


def missing_dataset(tmp_path: Path, fake: Path) -> tuple[list[str], str]:
    return ["dataset=mtiles", f"paths.data_dir={tmp_path / 'nowhere'}"], f"not found at {tmp_path / 'nowhere'}"


def unexpected_mask_values(tmp_path: Path, fake: Path) -> tuple[list[str], str]:
    shutil.copytree(fake / "Folder_data", tmp_path / "data" / "Folder_data")
    mask = sorted((tmp_path / "data" / "Folder_data" / "masks").glob("*.png"))[0]
    values = cv2.imread(str(mask), cv2.IMREAD_UNCHANGED)
    values[:4, :4] = 7
    cv2.imwrite(str(mask), values)
    overrides = ["dataset=folder", f"paths.data_dir={tmp_path / 'data'}", f"paths.cache_dir={tmp_path / 'cache'}"]
    return [*overrides, "dataset.image_size=[32,32]"], f"{mask.name}"


def split_with_unknown_image(tmp_path: Path, fake: Path) -> tuple[list[str], str]:
    bad = tmp_path / "split.json"
    bad.write_text(json.dumps({"labeled": ["nope"], "unlabeled": [], "val": [], "test": []}))
    return [f"split_file={bad}"], "image 'nope'"


def split_not_json(tmp_path: Path, fake: Path) -> tuple[list[str], str]:
    bad = tmp_path / "split.json"
    bad.write_text("{ not json")
    return [f"split_file={bad}"], f"split_file={bad}"


def truncated_jpeg(tmp_path: Path, fake: Path) -> tuple[list[str], str]:
    data_dir = fake_mtiles(tmp_path, fake)
    for image in (data_dir / "MTiles_data").rglob("*.jpg"):  # cut every JPEG: whichever loads first stops the run
        image.write_bytes(image.read_bytes()[: image.stat().st_size * 2 // 3])
    return mtiles(data_dir), "truncated JPEG"


def empty_folder_dataset(tmp_path: Path, fake: Path) -> tuple[list[str], str]:
    root = tmp_path / "data" / "Folder_data"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    overrides = ["dataset=folder", f"paths.data_dir={tmp_path / 'data'}", f"paths.cache_dir={tmp_path / 'cache'}"]
    return overrides, f"has no training images in {root}"


def text_checkpoint(tmp_path: Path, fake: Path) -> tuple[list[str], str]:
    bad = tmp_path / "notes.ckpt"
    bad.write_text("these are my notes, not a checkpoint\n")
    return [f"ckpt_path={bad}"], f"ckpt_path={bad}: not a PyTorch checkpoint"


def checkpoint_of_other_classes(tmp_path: Path, fake: Path) -> tuple[list[str], str]:
    other = tmp_path / "two_classes.ckpt"
    hyper = {"class_names": ["background", "defect"], "in_channels": 3}
    torch.save({"state_dict": {}, "hyper_parameters": hyper}, other)
    return [f"ckpt_path={other}"], f"ckpt_path={other} was trained on 2 classes"


def split_of_another_ratio(tmp_path: Path, fake: Path) -> tuple[list[str], str]:
    made = tmp_path / "split.json"
    parts = {"labeled": ["synthetic_00000"], "unlabeled": ["synthetic_00001"], "val": ["synthetic_00002"]}
    made.write_text(json.dumps({**parts, "test": ["synthetic_00003"], "meta": {"labeled_ratio": 0.1}}))
    return [f"split_file={made}", "labeled_ratio=0.5"], f"split_file={made} was made with labeled_ratio=0.1"


def values(*overrides: str, culprit: str) -> Callable[[Path, Path], tuple[list[str], str]]:
    return lambda tmp_path, fake: (list(overrides), culprit)


CASES: dict[str, Callable[[Path, Path], tuple[list[str], str]]] = {
    # command-line and config values
    "labeled_ratio zero": values("labeled_ratio=0", culprit="labeled_ratio=0"),
    "labeled_ratio above one": values("labeled_ratio=1.5", culprit="labeled_ratio=1.5"),
    "labeled_ratio not a number": values("labeled_ratio=abc", culprit="labeled_ratio='abc'"),
    "seed not an integer": values("seed=abc", culprit="seed='abc'"),
    "seed negative": values("seed=-5", culprit="seed=-5 must lie in 0..4294967295"),
    "monitor unknown": values("evaluation.monitor=val/mIoUU", culprit="evaluation.monitor=val/mIoUU"),
    "validation after the budget": values(
        "trainer.max_steps=2", "trainer.val_check_interval=5", culprit="trainer.val_check_interval=5"
    ),
    "checkpoint not a checkpoint": text_checkpoint,
    "checkpoint of other classes": checkpoint_of_other_classes,
    "image size not a multiple": values("dataset.image_size=[30,30]", culprit="dataset.image_size=[30,30]"),
    "unknown method option": values("+method.no_such_option=1", culprit="no_such_option"),
    "batch size zero": values("data.batch_size_labeled=0", culprit="data.batch_size_labeled=0"),
    "num_workers negative": values("data.num_workers=-1", culprit="data.num_workers=-1"),
    "learning rate negative": values("optimizer.lr=-1", culprit="optimizer.lr=-1"),
    "max_steps zero": values("trainer.max_steps=0", culprit="trainer.max_steps=0"),
    "val_fraction too large": values("dataset.val_fraction=1.2", culprit="dataset.val_fraction=1.2"),
    "on_nonfinite unknown": values("numerics.on_nonfinite=maybe", culprit="numerics.on_nonfinite='maybe'"),
    "checkpoint missing": values("ckpt_path=/nonexistent/last.ckpt", culprit="ckpt_path=/nonexistent/last.ckpt"),
    "split file missing": values("split_file=/nonexistent/split.json", culprit="split_file=/nonexistent/split.json"),
    "split file not json": split_not_json,
    "split file names unknown image": split_with_unknown_image,
    "split file of another ratio": split_of_another_ratio,
    # Hydra's own errors about the command line (multi-line messages that name the key and the options)
    "unknown method": values("method=no_such_method", culprit="no_such_method"),
    "mistyped key": values("labeled_ratioo=0.1", culprit="labeled_ratioo"),
    # dataset contents
    "dataset folder missing": missing_dataset,
    "class folder missing": missing_class_folder,
    "image without mask": missing_mask,
    "mask without image": orphan_mask,
    "unreadable image": unreadable_image,
    "truncated image": truncated_jpeg,
    "folder dataset empty": empty_folder_dataset,
    "mask size differs from image": size_mismatch,
    "mask values outside the classes": unexpected_mask_values,
}
HYDRA_ERRORS = {"unknown method", "mistyped key"}


def run_cli(overrides: list[str], run_dir: Path, capsys: pytest.CaptureFixture) -> tuple[int, str]:
    """``python -m semiseg.train OVERRIDES`` in this process: (exit code, stderr)."""
    argv = sys.argv
    sys.argv = ["semiseg.train", *FAST, *overrides, f"hydra.run.dir={run_dir}"]
    GlobalHydra.instance().clear()
    train_app._task_started = False
    code = 0
    try:
        train_app.cli()
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else 1
    finally:
        sys.argv = argv
        GlobalHydra.instance().clear()
    return code, capsys.readouterr().err


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_exits_2_with_one_line(
    case: str, tmp_path: Path, fake_data_dir: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    overrides, culprit = CASES[case](tmp_path, fake_data_dir)
    code, stderr = run_cli(overrides, tmp_path / "run", capsys)
    assert code == 2, stderr[-2000:]
    assert "Traceback" not in stderr
    assert culprit in stderr, stderr[-2000:]
    if case not in HYDRA_ERRORS:
        lines = [line for line in stderr.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and culprit in lines[0], stderr[-2000:]


def test_table_in_docs_lists_every_case() -> None:
    table = (ROOT / "docs" / "errors.md").read_text()
    for case in CASES:
        assert f"| {case} |" in table, f"docs/errors.md lacks a row for '{case}'"


def test_full_error_raises_with_the_trace(tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch) -> None:
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    with pytest.raises(ConfigError, match="labeled_ratio=0"):
        run_cli(["labeled_ratio=0"], tmp_path / "run", capsys)


def test_bad_input_as_a_real_subprocess(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "semiseg.train", "method=no_such_method", f"hydra.run.dir={tmp_path}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={**{k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}, "PYTHONPATH": str(ROOT / "src")},
    )  # fmt: skip
    assert done.returncode == 2 and "no_such_method" in done.stderr and "Traceback" not in done.stderr


def test_a_truncated_image_is_skipped_with_a_warning_when_asked(
    tmp_path: Path, fake_data_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from conftest import compose_config
    from semiseg.train import train

    data_dir = fake_mtiles(tmp_path, fake_data_dir)
    images = sorted((data_dir / "MTiles_data").rglob("*.jpg"))
    for image in images:
        image.write_bytes(image.read_bytes()[: image.stat().st_size * 2 // 3])
    good = images[1:]  # all but one damaged: each is used only when it is the sample drawn
    for image in good:
        shutil.copy(fake_data_dir / image.relative_to(data_dir), image)
    results = train(compose_config([*mtiles(data_dir), "data.damaged_images=skip"], tmp_path / "run"))
    assert results["steps"] == 2
    warned = [record.getMessage() for record in caplog.records if "skipping a damaged image" in record.getMessage()]
    assert warned and all(str(images[0]) in message for message in warned)
