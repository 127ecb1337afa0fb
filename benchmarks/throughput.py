"""Training throughput of a method against what the data pipeline delivers (a benchmark, not a test).

    python benchmarks/throughput.py [--image-size 128] [--batch 8] [--steps 30] [--workers auto]

Prints images/s of (a) supervised training of ``model=unet`` on a fixed batch (no loading), and (b) the
training loaders alone (synthetic set, the default augmentation, labeled + unlabeled images), and
writes them as JSON to ``bench_out/throughput.json``. The loaders must deliver at least 3x what the model
consumes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from semiseg.config import compose_config  # noqa: E402
from semiseg.methods.base import SemiSupervisedModule  # noqa: E402
from semiseg.runner import build_datamodule, build_module  # noqa: E402


def config(image_size: int, batch: int, workers: str, method: str = "supervised", dataset: str = "synthetic"):
    overrides = [
        f"method={method}",
        f"dataset={dataset}",
        f"dataset.image_size=[{image_size},{image_size}]",
        f"data.batch_size_labeled={batch}",
        f"data.batch_size_unlabeled={batch}",
        f"data.num_workers={workers}",
    ]
    return compose_config(overrides, output_dir=ROOT / "bench_out")


def training_images_per_second(cfg, steps: int, warmup: int = 3) -> float:
    """Supervised optimisation steps on one fixed labeled batch; images/s of the labeled batch."""
    module = build_module(cfg)
    module.train()
    optimizer = module.configure_optimizers()
    optimizer = optimizer["optimizer"] if isinstance(optimizer, dict) else optimizer
    size, batch = cfg.dataset.image_size, cfg.data.batch_size_labeled
    labeled = {
        "image": torch.randn(batch, cfg.dataset.in_channels, *size),
        "mask": torch.randint(0, len(cfg.dataset.class_names), (batch, *size)),
    }
    for step in range(warmup + steps):
        if step == warmup:
            started = time.perf_counter()
        loss, _ = module.training_losses(labeled, None)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return steps * batch / (time.perf_counter() - started)


def loader_images_per_second(cfg, epochs: int = 2) -> float:
    """Images/s out of the combined training loader (labeled + unlabeled views) in the steady state:
    one epoch to warm up (workers start, synthetic images render and are cached), then ``epochs`` timed."""
    datamodule = build_datamodule(cfg, SemiSupervisedModule)
    loader = datamodule.train_dataloader()
    for _ in loader:
        pass
    images, started = 0, time.perf_counter()
    for _ in range(epochs):
        for batch, *_ in loader:
            images += sum(part["image"].shape[0] for part in batch.values())
    return images / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--workers", default="auto")
    parser.add_argument("--dataset", default="synthetic", help="e.g. mtiles (reads SEMISEG_DATA_DIR)")
    args = parser.parse_args()

    cfg = config(args.image_size, args.batch, args.workers, dataset=args.dataset)
    train_rate = training_images_per_second(cfg, args.steps)
    loader_rate = loader_images_per_second(cfg)
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads",
        "dataset": args.dataset,
        "image_size": args.image_size,
        "batch": args.batch,
        "workers": args.workers,
        "supervised_train_images_per_s": round(train_rate, 1),
        "loader_images_per_s": round(loader_rate, 1),
        "loader_to_model_ratio": round(loader_rate / train_rate, 2),
    }
    out = ROOT / "bench_out"
    out.mkdir(exist_ok=True)
    (out / "throughput.json").write_text(json.dumps(result, indent=2) + "\n")
    width = max(map(len, result))
    for key, value in result.items():
        print(f"{key:<{width}}  {value}")


if __name__ == "__main__":
    main()
