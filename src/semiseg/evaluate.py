"""Evaluate or apply a saved model: ``python -m semiseg.evaluate ckpt=PATH [dataset=NAME] [split=test]``.

* **Evaluate** on a split of a dataset: by default the run's own dataset and ``split.json`` (both found beside
  the checkpoint, in the run directory), so ``split=test`` reproduces the run's test metrics. ``dataset=NAME``
  evaluates on another dataset with the same classes (its official test split, or a split made with
  ``split_seed``). ``split`` is one of ``test``, ``val``, ``labeled``, ``unlabeled`` (with their hidden masks) or
  ``all``. Writes ``evaluation.json`` into this command's own output directory.
* **Predict** on a folder of images: ``input_dir=FOLDER`` writes one class-index PNG mask per image (the
  image's file stem, the image's own size) into ``<output_dir>/masks``, one row per image of
  ``predictions.csv`` and, with ``overlay=true``, colour overlays (:mod:`semiseg.predict`). ``ckpt`` may also be
  an exported ``model.onnx`` / ``model.pt`` (or its folder) from ``semiseg.export``. A model trained on
  ``data.crop_size`` crops runs through the sliding window at each image's resolution, here and on splits.

The checkpoint is loaded with ``weights_only=True`` where it allows (checkpoints written by semiseg do, unless a
method keeps non-tensor state); ``trust_checkpoint=true`` allows the full unpickler for a file you trust.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

from semiseg import predict
from semiseg.callbacks import PerImageCSV
from semiseg.checkpoints import read_checkpoint
from semiseg.config import CONFIG_DIR
from semiseg.data.datamodule import SemiSupervisedDataModule
from semiseg.errors import ConfigError, check_choice, exit_on_user_error, run_hydra_app
from semiseg.io import atomic_write_json
from semiseg.results import CONFIG_FILE, PER_IMAGE_FILE, SPLIT_FILE, number

log = logging.getLogger("semiseg.evaluate")

SPLITS = ("test", "val", "labeled", "unlabeled", "all")
EVALUATION_FILE = "evaluation.json"


def load_checkpoint(path: Path, trust: bool) -> dict[str, Any]:
    """The checkpoint's content, read with ``weights_only=True`` unless ``trust`` (one-line errors)."""
    return read_checkpoint(path, "ckpt", trust)


def find_run_config(checkpoint_path: Path) -> tuple[DictConfig | None, Path | None]:
    """The training run's ``config.yaml`` and run directory: beside the checkpoint or one folder up."""
    for folder in (checkpoint_path.parent, checkpoint_path.parent.parent):
        if (folder / CONFIG_FILE).is_file():
            return OmegaConf.load(folder / CONFIG_FILE), folder
    return None, None


def load_module(checkpoint_path: Path, checkpoint: dict[str, Any], run_cfg: DictConfig | None) -> Any:
    """The method module with the checkpoint's weights, in eval mode."""
    info = checkpoint.get("semiseg") or {}
    class_path = info.get("method_class") or (run_cfg.method._target_ if run_cfg is not None else None)
    if class_path is None:
        raise ConfigError(f"ckpt={checkpoint_path}: cannot tell which method wrote it (no run config.yaml beside it)")
    module = get_class(class_path)(**checkpoint["hyper_parameters"])
    module.load_state_dict(checkpoint["state_dict"])
    return module.eval()


def dataset_config(cfg: DictConfig, run_cfg: DictConfig | None) -> tuple[DictConfig, bool]:
    """The dataset to evaluate on and whether it is the run's own."""
    if cfg.get("dataset") is not None:
        same = run_cfg is not None and run_cfg.dataset.name == cfg.dataset.name
        return (run_cfg.dataset if same else cfg.dataset), same
    if run_cfg is None:
        raise ConfigError("no run config.yaml beside the checkpoint: say which data to use with dataset=NAME")
    return run_cfg.dataset, True


def build_datamodule(
    cfg: DictConfig, run_cfg: DictConfig | None, run_dir: Path | None, native: bool = False
) -> SemiSupervisedDataModule:
    dataset_cfg, same = dataset_config(cfg, run_cfg)
    split_file = str(run_dir / SPLIT_FILE) if same and run_dir and (run_dir / SPLIT_FILE).is_file() else None
    run_data = run_cfg.data if run_cfg is not None else {}
    return SemiSupervisedDataModule(
        dataset=instantiate(dataset_cfg.source, _convert_="all"),
        labeled_ratio=float(run_data.get("labeled_ratio", 1.0)) if same else 1.0,
        split_seed=int(cfg.split_seed if cfg.split_seed is not None else run_data.get("split_seed", 0)),
        val_fraction=dataset_cfg.val_fraction,
        test_fraction=dataset_cfg.test_fraction,
        image_size=list(dataset_cfg.image_size),
        mean=list(dataset_cfg.mean),
        std=list(dataset_cfg.std),
        batch_size_eval=cfg.batch_size,
        num_workers=cfg.num_workers,
        use_unlabeled=False,
        split_file=split_file,
        native_eval=native,  # a model trained on crops: whole images at their own size (sliding window)
        scale=float(run_data.get("scale", 1.0) or 1.0),
    )


def evaluate_split(
    cfg: DictConfig, module: Any, datamodule: SemiSupervisedDataModule, output_dir: Path
) -> dict[str, Any]:
    """Test metrics of ``module`` on one part of the split; ``per_image.csv`` in ``output_dir`` as a run writes."""
    parts = ["labeled", "unlabeled", "val", "test"] if cfg.split == "all" else [cfg.split]
    datasets = [datamodule.part_dataset(part, views=datamodule.eval_views, with_masks=True) for part in parts]
    dataset = torch.utils.data.ConcatDataset(datasets)
    if len(dataset) == 0:
        raise ConfigError(f"split={cfg.split} holds no image for this dataset and split")
    loader = datamodule._loader(dataset, datamodule.batch_size_eval, train=False)
    trainer = L.Trainer(
        accelerator=cfg.accelerator,
        devices=1,
        logger=False,
        enable_model_summary=False,
        callbacks=[PerImageCSV(str(output_dir / PER_IMAGE_FILE))],
    )
    metrics = trainer.test(module, dataloaders=loader, verbose=cfg.verbose)[0]
    return {
        "split": cfg.split,
        "num_images": len(dataset),
        "metrics": {k: number(v) for k, v in sorted(metrics.items())},
    }


def predict_folder(
    cfg: DictConfig, module: Any, dataset_cfg: DictConfig, output_dir: Path, run_cfg: DictConfig | None = None
) -> dict[str, Any]:
    """Predict every image of ``cfg.input_dir`` with the checkpoint's module (see :mod:`semiseg.predict`)."""
    card = predict.model_card(module, dataset_cfg, run_cfg, Path(cfg.ckpt))
    module.to("cuda" if cfg.accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available() else "cpu")
    return predict.predict_folder(predict.checkpoint_predictor(module, card), cfg.input_dir, output_dir, cfg.overlay)


@exit_on_user_error
def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Run the evaluation (or prediction) described by ``cfg``; returns what ``evaluation.json`` holds."""
    if cfg.get("ckpt") in (None, "", "???"):
        raise ConfigError("ckpt=PATH is required: the .ckpt file of a run, e.g. ckpt=outputs/.../checkpoints/last.ckpt")
    check_choice("split", cfg.split, SPLITS)
    exported = predict.exported_model_path(cfg.ckpt) if cfg.get("input_dir") else None
    if exported is not None:  # an exported model (semiseg.export) predicting a folder
        result = {
            "ckpt": str(exported),
            **predict.predict_folder(
                predict.exported_predictor(exported), cfg.input_dir, Path(cfg.output_dir), cfg.overlay
            ),
        }
        atomic_write_json(Path(cfg.output_dir) / EVALUATION_FILE, result)
        return result
    checkpoint_path = Path(cfg.ckpt)
    checkpoint = load_checkpoint(checkpoint_path, bool(cfg.trust_checkpoint))
    run_cfg, run_dir = find_run_config(checkpoint_path)
    module = load_module(checkpoint_path, checkpoint, run_cfg)
    output_dir = Path(cfg.output_dir)
    dataset_cfg, _ = dataset_config(cfg, run_cfg) if cfg.get("dataset") is not None or run_cfg else (None, False)
    if dataset_cfg is not None and list(dataset_cfg.class_names) != list(module.class_names):
        raise ConfigError(
            f"dataset={dataset_cfg.name} has classes {list(dataset_cfg.class_names)} but the checkpoint was trained "
            f"on {list(module.class_names)}; evaluate on a dataset with the same classes"
        )
    result: dict[str, Any] = {"ckpt": str(checkpoint_path), "method": module.method_name}
    if cfg.get("input_dir"):
        if dataset_cfg is None:
            raise ConfigError("predicting needs the training image size and normalisation: add dataset=NAME")
        result.update(predict_folder(cfg, module, dataset_cfg, output_dir, run_cfg))
    else:
        datamodule = build_datamodule(cfg, run_cfg, run_dir, native=module.sliding_window is not None)
        result["dataset"] = datamodule.dataset.name
        result.update(evaluate_split(cfg, module, datamodule, output_dir))
    atomic_write_json(output_dir / EVALUATION_FILE, result)
    log.info("%s", json.dumps(result.get("metrics", result), indent=1)[:2000])
    return result


_task_started = False


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="evaluate")
def main(cfg: DictConfig) -> None:
    global _task_started
    _task_started = True
    evaluate(cfg)


def cli() -> None:
    run_hydra_app(main, lambda: _task_started)


if __name__ == "__main__":
    cli()
