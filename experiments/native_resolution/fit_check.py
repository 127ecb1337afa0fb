"""Does a trained run fit its own labeled training batches? A diagnostic for runs that test at mIoU 0.

Rebuilds the run's DataModule from its ``config.yaml`` and ``split.json`` (same crops, defect-centred sampling
and augmentation as in training, other random draws), runs the checkpoint on ``--batches`` labeled training
batches and prints the pixel confusion matrix (rows: true class, columns: predicted) and the IoU of each class
on those batches. A network that predicts background on the very crops it was trained on has not started to
learn at this budget: the test mIoU then says nothing about resolution or about the unlabeled images.

    SEMISEG_DATA_DIR=/path/to/data python experiments/native_resolution/fit_check.py RUN_DIR [--batches 10]
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Iterator
from pathlib import Path

import torch
from omegaconf import OmegaConf

from semiseg.data.datamodule import SemiSupervisedDataModule
from semiseg.evaluate import load_checkpoint, load_module
from semiseg.methods.supervised import Supervised
from semiseg.metrics import SegmentationMetrics
from semiseg.results import CONFIG_FILE, SPLIT_FILE
from semiseg.runner import build_datamodule


def _labeled_batches(datamodule: SemiSupervisedDataModule, num_batches: int) -> Iterator[dict]:
    """``num_batches`` labeled training batches, over as many passes of the labeled images as that takes."""
    served = 0
    while served < num_batches:
        for batch in datamodule.train_dataloader():
            yield batch[0]["labeled"] if isinstance(batch, tuple) else batch["labeled"]
            served += 1
            if served == num_batches:
                return


def fit_check(run_dir: Path, checkpoint_name: str, num_batches: int, seed: int) -> dict:
    """Confusion matrix ``(K, K)`` and per-class IoU of the checkpoint on ``num_batches`` labeled training
    batches ``(B, C, h, w)`` of the run, pixels at the ignore index left out."""
    cfg = OmegaConf.load(run_dir / CONFIG_FILE)
    checkpoint_path = run_dir / "checkpoints" / checkpoint_name
    module = load_module(checkpoint_path, load_checkpoint(checkpoint_path, False), cfg)
    cfg.data.split_file = str(run_dir / SPLIT_FILE)
    cfg.data.num_workers = 0
    datamodule = build_datamodule(cfg, Supervised)  # the run's data settings, labeled images only
    datamodule.setup("fit")
    metrics = SegmentationMetrics(list(cfg.dataset.class_names), ignore_index=int(cfg.data.ignore_index))
    torch.manual_seed(seed)
    for labeled in _labeled_batches(datamodule, num_batches):
        with torch.no_grad():
            metrics.update(module(labeled["image"]), labeled["mask"])
    scores = metrics.compute()
    confusion = metrics.confmat  # (K, K): rows true class, columns predicted
    iou = [float(scores[f"IoU/{name}"]) for name in cfg.dataset.class_names]
    iou = [None if math.isnan(value) else round(value, 4) for value in iou]  # None: class neither true nor predicted
    true_share = confusion.sum(1).float() / confusion.sum()
    return {
        "run": str(run_dir),
        "checkpoint": checkpoint_name,
        "batches": num_batches,
        "classes": list(cfg.dataset.class_names),
        "true_pixel_share": [round(float(v), 4) for v in true_share],
        "predicted_defect_share": round(float(confusion[:, metrics.defect_classes].sum()) / float(confusion.sum()), 4),
        "iou_on_training_batches": iou,
        "confusion": confusion.tolist(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories (config.yaml, split.json, checkpoints/)")
    parser.add_argument("--checkpoint", default="last.ckpt", help="file name in the run's checkpoints/")
    parser.add_argument("--batches", type=int, default=10, help="labeled training batches to score")
    parser.add_argument("--seed", type=int, default=0, help="seed of the crop and augmentation draws")
    args = parser.parse_args()
    for run_dir in args.runs:
        print(json.dumps(fit_check(run_dir, args.checkpoint, args.batches, args.seed)))


if __name__ == "__main__":
    main()
