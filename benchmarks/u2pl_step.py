"""Time of one U2PL training step on this machine (a benchmark, not a test).

    python benchmarks/u2pl_step.py [--image-size 128] [--batch 4] [--steps 5] [--encoder resnet18] [--classes 6]

Builds ``method=u2pl`` (DeepLabv3+, representation head, EMA teacher, memory queues) from the Hydra config
and runs full optimisation steps on fixed random batches (``batch`` labeled + ``batch`` unlabeled images):
two teacher passes, one student pass, all losses, backward, optimizer step and EMA update. Prints the mean
and median step time, the share spent in the contrastive part, and the queues' size, and writes them as JSON
to ``bench_out/u2pl_step.json``. The queues fill during the warm-up steps, so timed steps sample full queues
as in a long run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import semiseg.methods.u2pl as u2pl_module  # noqa: E402
from semiseg.config import compose_config  # noqa: E402
from semiseg.runner import build_module  # noqa: E402


def make_config(args: argparse.Namespace):
    names = ["background", *[f"defect{i}" for i in range(1, args.classes)]]
    overrides = [
        "method=u2pl",
        f"model.encoder_name={args.encoder}",
        f"dataset.image_size=[{args.image_size},{args.image_size}]",
        f"dataset.class_names=[{','.join(names)}]",
        f"method.queue_size={args.queue_size}",
        f"method.background_queue_size={args.background_queue_size}",
    ]
    return compose_config(overrides, output_dir=ROOT / "bench_out")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4, help="labeled and unlabeled images per step (each)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--encoder", default="resnet18")
    parser.add_argument("--classes", type=int, default=6, help="number of classes, background included")
    parser.add_argument("--queue-size", type=int, default=30000)
    parser.add_argument("--background-queue-size", type=int, default=50000)
    args = parser.parse_args()

    torch.manual_seed(0)
    cfg = make_config(args)
    module = build_module(cfg)
    module.train()
    optimizer = module.configure_optimizers()
    optimizer = optimizer["optimizer"] if isinstance(optimizer, dict) else optimizer
    size, channels = (args.image_size, args.image_size), cfg.dataset.in_channels
    labeled = {
        "image": torch.randn(args.batch, channels, *size),
        "mask": torch.randint(0, args.classes, (args.batch, *size)),
    }
    unlabeled = {"image": torch.randn(args.batch, channels, *size)}

    contrastive_seconds = [0.0]
    original = u2pl_module.contrastive_loss

    def timed_contrastive(*a, **k):
        started = time.perf_counter()
        result = original(*a, **k)
        contrastive_seconds[0] += time.perf_counter() - started
        return result

    u2pl_module.contrastive_loss = timed_contrastive
    times, contrastive = [], []
    for step in range(args.warmup + args.steps):
        contrastive_seconds[0] = 0.0
        started = time.perf_counter()
        loss, _ = module.training_losses(labeled, unlabeled)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        module.teacher.update(module.net, 0.99)
        elapsed = time.perf_counter() - started
        if step >= args.warmup:
            times.append(elapsed)
            contrastive.append(contrastive_seconds[0])
    u2pl_module.contrastive_loss = original

    result = {
        "image_size": args.image_size,
        "batch_labeled": args.batch,
        "batch_unlabeled": args.batch,
        "encoder": args.encoder,
        "classes": args.classes,
        "steps_timed": args.steps,
        "step_seconds_mean": round(statistics.mean(times), 3),
        "step_seconds_median": round(statistics.median(times), 3),
        "contrastive_share": round(sum(contrastive) / sum(times), 3),
        "queue_entries": len(module.memory),
        "queue_megabytes": round(module.memory.nbytes() / 1e6, 1),
        "torch_threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_average_1min": round(os.getloadavg()[0], 2),
    }
    print(
        f"U2PL step ({args.batch}+{args.batch} images of {args.image_size}x{args.image_size}, {args.encoder}, "
        f"{torch.get_num_threads()} threads): mean {result['step_seconds_mean']} s, "
        f"median {result['step_seconds_median']} s; contrastive part {100 * result['contrastive_share']:.1f}%; "
        f"queues {result['queue_entries']} entries, {result['queue_megabytes']} MB "
        f"(load average {result['load_average_1min']})"
    )
    out = ROOT / "bench_out"
    out.mkdir(exist_ok=True)
    (out / "u2pl_step.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
