"""``python -m semiseg.export`` (ONNX, TorchScript, parity check) and predicting a folder from an export."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import open_dict

import semiseg.evaluate as evaluate_app
import semiseg.export as export_app
from semiseg.config import CONFIG_DIR
from semiseg.train import train

CROPS = ["dataset.image_size=[40,40]", "data.crop_size=[16,16]", "evaluation.sliding_window=true"]


def _compose(config_name: str, overrides: list[str], output_dir: Path):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=overrides)
    with open_dict(cfg):
        cfg.output_dir = str(output_dir)
    return cfg


def export(*overrides: str, output_dir: Path) -> dict:
    return export_app.export(_compose("export", list(overrides), output_dir))


def evaluate(*overrides: str, output_dir: Path) -> dict:
    return evaluate_app.evaluate(_compose("evaluate", ["num_workers=0", "verbose=false", *overrides], output_dir))


@pytest.fixture(scope="module")
def resize_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from conftest import compose_config

    run_dir = tmp_path_factory.mktemp("run")
    train(compose_config(["trainer.max_steps=2"], run_dir))
    return run_dir / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def uaps_crop_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from conftest import compose_config

    run_dir = tmp_path_factory.mktemp("run")
    train(compose_config(["method=uaps", "trainer.max_steps=2", *CROPS], run_dir))
    return run_dir / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for stem, (height, width) in {"a": (40, 56), "b": (23, 70)}.items():
        cv2.imwrite(str(folder / f"{stem}.png"), rng.integers(0, 255, (height, width, 3), dtype=np.uint8))
    return folder


def test_onnx_export_matches_the_checkpoint_and_predicts_a_folder(
    resize_run: Path, images: Path, tmp_path: Path, capsys
) -> None:
    pytest.importorskip("onnxruntime")
    card = export(f"ckpt={resize_run}", "format=onnx", output_dir=tmp_path / "export")
    assert "parity: max |logit difference|" in capsys.readouterr().out
    assert card["parity"]["max_abs_logit_difference"] <= 1e-4
    assert (tmp_path / "export" / "model.onnx").is_file()
    written = json.loads((tmp_path / "export" / "model.json").read_text())
    assert written["class_names"][0] == "background" and written["preprocessing"]["mode"] == "resize"
    assert written["run"]["method"] == "supervised" and written["input"]["size"] == [32, 32]

    from_export = evaluate(
        f"ckpt={tmp_path / 'export' / 'model.onnx'}", f"input_dir={images}", "overlay=true",
        output_dir=tmp_path / "from_export",
    )  # fmt: skip
    evaluate(f"ckpt={resize_run}", f"input_dir={images}", output_dir=tmp_path / "from_checkpoint")
    assert from_export["num_images"] == 2
    for stem, size in {"a": (40, 56), "b": (23, 70)}.items():
        exported = cv2.imread(str(tmp_path / "from_export" / "masks" / f"{stem}.png"), cv2.IMREAD_UNCHANGED)
        reference = cv2.imread(str(tmp_path / "from_checkpoint" / "masks" / f"{stem}.png"), cv2.IMREAD_UNCHANGED)
        assert exported.shape == size
        assert (exported == reference).mean() > 0.999
        assert (tmp_path / "from_export" / "overlays" / f"{stem}.png").is_file()
    with open(tmp_path / "from_export" / "predictions.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["image"] for row in rows] == ["a.png", "b.png"]
    assert list(rows[0])[:4] == ["image", "defect_pixels", "defect_share", "max_probability"]
    assert {"area_scratch", "area_spot", "area_crack", "area_patch"} <= set(rows[0])
    for row, (height, width) in zip(rows, [(40, 56), (23, 70)], strict=True):
        areas = sum(int(row[key]) for key in row if key.startswith("area_"))
        assert areas == int(row["defect_pixels"])
        assert float(row["defect_share"]) == pytest.approx(areas / (height * width), abs=1e-6)
        assert 0.0 <= float(row["max_probability"]) <= 1.0


def test_torchscript_export_of_uaps_keeps_the_main_decoder_and_the_sliding_window(
    uaps_crop_run: Path, images: Path, tmp_path: Path
) -> None:
    card = export(f"ckpt={uaps_crop_run}", "format=torchscript", output_dir=tmp_path / "export")
    assert card["preprocessing"]["mode"] == "sliding_window" and card["preprocessing"]["window_size"] == [16, 16]
    assert card["input"]["size"] == [16, 16]
    scripted = torch.jit.load(str(tmp_path / "export" / "model.pt"))
    exported_params = sum(p.numel() for p in scripted.parameters())
    checkpoint = torch.load(uaps_crop_run, map_location="cpu", weights_only=True)
    all_params = sum(v.numel() for k, v in checkpoint["state_dict"].items() if k.endswith(("weight", "bias")))
    main_params = sum(
        v.numel()
        for k, v in checkpoint["state_dict"].items()
        if k.startswith("net.network.") and k.endswith(("weight", "bias"))
    )
    assert exported_params == main_params < all_params  # the auxiliary decoders stayed behind
    # a 23x70 image is smaller than a tile in height: padded, tiled, cut back to its own size
    result = evaluate(f"ckpt={tmp_path / 'export'}", f"input_dir={images}", output_dir=tmp_path / "predicted")
    assert result["preprocessing"] == "sliding_window"
    mask = cv2.imread(str(tmp_path / "predicted" / "masks" / "b.png"), cv2.IMREAD_UNCHANGED)
    assert mask.shape == (23, 70)


def test_a_non_finite_model_is_refused(resize_run: Path, tmp_path: Path, capsys) -> None:
    checkpoint = torch.load(resize_run, map_location="cpu", weights_only=True)
    name = next(key for key in checkpoint["state_dict"] if key.endswith("weight"))
    checkpoint["state_dict"][name][...] = float("nan")
    broken = tmp_path / "run" / "checkpoints" / "broken.ckpt"
    broken.parent.mkdir(parents=True)
    torch.save(checkpoint, broken)
    (tmp_path / "run" / "config.yaml").write_text((resize_run.parent.parent / "config.yaml").read_text())
    with pytest.raises(SystemExit) as stop:
        export(f"ckpt={broken}", "format=torchscript", output_dir=tmp_path / "export")
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "NaN/Inf" in err and name.removeprefix("net.") in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "export" / "model.pt").exists()


def test_a_parity_failure_exits_non_zero_and_writes_nothing(
    resize_run: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    monkeypatch.setattr(export_app, "parity", lambda reference, exported: 3e-3)
    with pytest.raises(SystemExit) as stop:
        export(f"ckpt={resize_run}", "format=torchscript", output_dir=tmp_path)
    assert stop.value.code == 2
    assert "3.000e-03 > tolerance=1e-04" in capsys.readouterr().err
    assert not (tmp_path / "model.pt").exists() and not (tmp_path / "model.json").exists()
    assert not list(tmp_path.glob(".model.pt*"))  # no temporary file left behind


def test_missing_checkpoint_is_one_line(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    monkeypatch.setattr(sys, "argv", ["semiseg.export", f"ckpt={tmp_path / 'none.ckpt'}", f"hydra.run.dir={tmp_path}"])
    GlobalHydra.instance().clear()
    with pytest.raises(SystemExit) as done:
        export_app.cli()
    GlobalHydra.instance().clear()
    err = capsys.readouterr().err.strip()
    assert done.value.code == 2 and "no such checkpoint file" in err and len(err.splitlines()) == 1


def test_evaluate_reproduces_a_crop_runs_test_metrics_at_native_size(uaps_crop_run: Path, tmp_path: Path) -> None:
    run_dir = uaps_crop_run.parent.parent
    results = json.loads((run_dir / "results.json").read_text())
    evaluation = evaluate(f"ckpt={run_dir / results['checkpoint']}", output_dir=tmp_path)
    assert evaluation["num_images"] == results["split"]["test"]
    for key in ("test/mIoU", "test/pixel_acc", "test/loss"):
        assert evaluation["metrics"][key] == pytest.approx(results["metrics"][key], abs=1e-6)
