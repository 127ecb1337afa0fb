"""Training-step time of UAPS against the supervised baseline, beside their FLOP ratio (a benchmark, not a test).

    OMP_NUM_THREADS=1 python benchmarks/uaps_step.py [--image-size 128] [--batch 8] [--steps 10] [--aux 3]

Both methods train ``model=unet`` on the same fixed batch (``batch`` labeled + ``batch`` unlabeled images,
random tensors, 4 classes, no data loading). Printed:

* GMACs per image of the networks' forward pass at 256² (the paper: 8.64 for UAPS with three auxiliary
  decoders against 2.98 for the U-Net) and at the benchmark size;
* FLOPs of one whole training step (forward + backward, both batches) from ``torch.utils.flop_counter``;
* the median wall time of a training step (forward, backward, Adam update) of each method, the two methods
  alternating step by step;
* the check: UAPS's time ratio must not exceed its FLOP ratio by more than 15%.

Results are also written as JSON to ``bench_out/uaps_step.json``.
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
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from semiseg.methods.supervised import Supervised  # noqa: E402
from semiseg.methods.uaps import UAPS  # noqa: E402

NUM_CLASSES = 4
IN_CHANNELS = 3
TOLERANCE = 0.15  # the UAPS step may cost its FLOP share plus 15%
MODEL = {"_target_": "semiseg.models.unet.UNet", "name": "unet"}


def build(method: str, num_aux: int) -> torch.nn.Module:
    common = {
        "model": MODEL,
        "class_names": [f"class{i}" for i in range(NUM_CLASSES)],
        "in_channels": IN_CHANNELS,
        "optimizer": {"_target_": "torch.optim.Adam", "_partial_": True, "lr": 1e-3},
    }
    if method == "uaps":
        # full ramp so that every loss term is active, as late in training
        return UAPS(num_aux_decoders=num_aux, rampup_length=0, name="uaps", **common)
    return Supervised(name="supervised", **common)


def make_batch(batch: int, size: int) -> dict:
    generator = torch.Generator().manual_seed(0)
    return {
        "labeled": {
            "image": torch.randn(batch, IN_CHANNELS, size, size, generator=generator),
            "mask": torch.randint(0, NUM_CLASSES, (batch, size, size), generator=generator),
        },
        "unlabeled": {"image": torch.randn(batch, IN_CHANNELS, size, size, generator=generator)},
    }


def forward_gmacs_per_image(module: torch.nn.Module, size: int) -> float:
    """GMACs of the training-time forward (all decoders for UAPS) of one image (FLOPs / 2)."""
    network = module.net
    forward = network.forward_all if hasattr(network, "forward_all") else network
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        forward(torch.randn(1, IN_CHANNELS, size, size))
    return counter.get_total_flops() / 2 / 1e9


def step(module: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: dict) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss, _ = module.training_losses(batch["labeled"], batch.get("unlabeled"))
    loss.backward()
    optimizer.step()


def step_flops(module: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: dict) -> int:
    counter = FlopCounterMode(display=False)
    with counter:
        step(module, optimizer, batch)
    return counter.get_total_flops()


def step_seconds(runs: dict[str, tuple[torch.nn.Module, torch.optim.Optimizer]], batch: dict, steps: int) -> dict:
    """Median wall time of a training step per method; the methods alternate step by step, so that a change in
    the machine's load during the measurement affects both alike."""
    for module, optimizer in runs.values():  # warm-up
        for _ in range(2):
            step(module, optimizer, batch)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(steps):
        for name, (module, optimizer) in runs.items():
            started = time.perf_counter()
            step(module, optimizer, batch)
            times[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--aux", type=int, default=3, help="auxiliary decoders of UAPS")
    args = parser.parse_args()
    torch.manual_seed(0)
    batch = make_batch(args.batch, args.image_size)
    figures: dict = {
        "image_size": args.image_size,
        "batch": f"{args.batch}+{args.batch}",
        "num_aux_decoders": args.aux,
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "cpu": platform.processor() or platform.machine(),
    }
    runs = {}
    for method in ("supervised", "uaps"):
        module = build(method, args.aux)
        module.train()
        optimizer = module.configure_optimizers()
        runs[method] = (module, optimizer)
        figures[method] = {
            "gmacs_per_image_256": round(forward_gmacs_per_image(module, 256), 3),
            f"gmacs_per_image_{args.image_size}": round(forward_gmacs_per_image(module, args.image_size), 3),
            "step_gflops": round(step_flops(module, optimizer, batch) / 1e9, 2),
        }
    for method, seconds in step_seconds(runs, batch, args.steps).items():
        figures[method]["step_seconds"] = round(seconds, 4)
    flop_ratio = figures["uaps"]["step_gflops"] / figures["supervised"]["step_gflops"]
    time_ratio = figures["uaps"]["step_seconds"] / figures["supervised"]["step_seconds"]
    figures["step_flop_ratio"] = round(flop_ratio, 3)
    figures["step_time_ratio"] = round(time_ratio, 3)
    figures["time_within_flop_share_plus_15pct"] = time_ratio <= flop_ratio * (1 + TOLERANCE)

    print(f"UAPS ({args.aux} aux decoders) vs supervised, U-Net, {args.image_size}², batch {args.batch}+{args.batch}")
    for method in ("supervised", "uaps"):
        row = figures[method]
        print(
            f"  {method:<10} forward GMACs/image @256²: {row['gmacs_per_image_256']:6.3f}   "
            f"step GFLOPs: {row['step_gflops']:8.2f}   step time: {row['step_seconds']:.3f} s"
        )
    print(
        f"  FLOP ratio of a step: {flop_ratio:.2f}   time ratio: {time_ratio:.2f}   "
        f"within FLOP share + 15%: {figures['time_within_flop_share_plus_15pct']}"
    )
    out = ROOT / "bench_out"
    out.mkdir(exist_ok=True)
    (out / "uaps_step.json").write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
