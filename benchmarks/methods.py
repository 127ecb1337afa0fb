"""Per-method speed and memory (a benchmark, not a test): ``make bench`` or

    python benchmarks/methods.py [--methods supervised,uaps,...] [--sizes 128 256] [--batch 8] [--steps 2 1]
                                 [--precision 32-true|bf16-mixed] [--channels-last true|false] [--compile]
                                 [--override optimizer.fused=true ...] [--isolate] [--out NAME]

For every method config (``conf/method/*.yaml``, but the generational self-training family, whose students train
supervised steps, ``cps_rg``, which grows labels held by the DataModule, and the ``*_cpu`` schedule variants) and
every image size it prints and writes to ``bench_out/methods.{md,json}``:

* training images/s: labeled + unlabeled images per second of full Lightning training steps (hooks such as EMA
  updates included) on one fixed batch, so that no data loading is counted (median of the timed steps after one
  warm-up step: 2 at 128², 1 at 256², where a step lasts 1.5-25 s on a 2-core CPU);
* inference images/s of the network that runs at test time (``predict_logits``);
* peak memory: CUDA's peak allocation on a GPU; on the CPU the growth of the peak resident set over the resident
  set before the method trains (freed heap memory is handed back with ``malloc_trim`` and the peak is reset
  through ``/proc/self/clear_refs`` before each method; ``--isolate`` runs each method in its own process);
* the step-time ratio to ``supervised`` beside the ratio of their FLOPs per training step (forward, backward and
  update of the first step, counted with ``torch.utils.flop_counter``, totals only, so that steps which take input
  gradients with ``torch.autograd.grad``, as DCT's adversarial views do, are counted too).

Fast paths are measured by running it twice, e.g. ``--methods supervised,uaps --sizes 128`` with
``--channels-last false`` and ``true``, or with and without ``--precision bf16-mixed``, ``--compile`` or
``--override optimizer.fused=true``; ``--out`` names the output files so that runs do not overwrite each other.

The data pipeline alone is measured by ``benchmarks/throughput.py`` (``make bench`` runs both).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
OUT = ROOT / "bench_out"
GENERATIONAL = {"im", "noisy_student", "im_plus", "aim_plus", "im_plusplus", "aim_plusplus", "model_ensemble",
                "input_ensemble", "consistency_loss", "aldt"}  # fmt: skip


# cps_rg grows labels held by the DataModule, so it cannot train on one fixed batch; *_cpu configs are the same
# networks and losses as their method with other schedules.
NOT_PER_STEP = {"cps_rg"}


def all_methods() -> list[str]:
    names = sorted(p.stem for p in (ROOT / "conf" / "method").glob("*.yaml"))
    skip = GENERATIONAL | NOT_PER_STEP
    return ["supervised", *[n for n in names if n != "supervised" and n not in skip and not n.endswith("_cpu")]]


class SameBatch:
    """An iterable that yields one batch ``length`` times (so that no loading is timed)."""

    def __init__(self, batch: dict, length: int) -> None:
        self.batch, self.length = batch, length

    def __iter__(self):
        return iter([self.batch] * self.length)

    def __len__(self) -> int:
        return self.length


def reset_peak_rss() -> bool:
    """Hand freed heap memory back to the system, then reset this process's peak resident set (Linux:
    ``malloc_trim`` and ``clear_refs`` 5), so that the next peak belongs to what runs next; False where the peak
    cannot be reset."""
    import ctypes
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to hand back
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def status_mib(field: str) -> float | None:
    """A memory field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``) in MiB; None where it cannot be read."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def resident_mib() -> float:
    """The resident set now, 0 where it cannot be read."""
    return status_mib("VmRSS") or 0.0


def total_flop_counter():
    """``torch.utils.flop_counter.FlopCounterMode`` counting totals only.

    Its per-module attribution hooks into autograd in a way that ``torch.autograd.grad`` inside a step does not
    support; the total needs no attribution, so the module tracker is replaced by one that reports every
    operation to the global count."""
    from torch.utils.flop_counter import FlopCounterMode

    class GlobalOnly:
        parents = frozenset({"Global"})

        def __enter__(self):
            return self

        def __exit__(self, *args: Any) -> None:
            return None

    counter = FlopCounterMode(display=False)
    counter.mod_tracker = GlobalOnly()
    return counter


def peak_rss_mib() -> float:
    """Peak resident set since the last reset (``VmHWM``), else since the process started."""
    peak = status_mib("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def measure(method: str, size: int, batch: int, steps: int, precision: str, overrides: list[str]):
    """One method at one size, in this process: dict of figures. ``overrides`` are Hydra overrides of the
    training config (``performance.*`` fast paths, ``optimizer.fused=true``, ...)."""
    import lightning as L
    import torch
    from hydra.utils import get_class

    from semiseg.config import compose_config
    from semiseg.runner import apply_performance, build_datamodule, build_module

    cfg = compose_config(
        [
            f"method={method}", f"dataset.image_size=[{size},{size}]", "++dataset.num_images=64",
            f"data.batch_size_labeled={batch}", f"data.batch_size_unlabeled={batch}", "data.num_workers=0",
            "labeled_ratio=0.25", *overrides,
        ],
        output_dir=OUT / "scratch",
    )  # fmt: skip
    L.seed_everything(0, workers=True)
    method_class = get_class(cfg.method._target_)
    datamodule = build_datamodule(cfg, method_class)
    batch_data, *_ = next(iter(datamodule.train_dataloader()))
    images_per_step = sum(part["image"].shape[0] for part in batch_data.values())
    module = apply_performance(build_module(cfg), cfg.performance)
    channels_last = bool(cfg.performance.channels_last)

    warmup = 1
    accelerator = "gpu" if torch.cuda.is_available() else "cpu"

    class Timer(L.Callback):
        """Times every training step; counts the FLOPs of the first (warm-up) step: forward, backward, update."""

        def __init__(self, count_flops: bool) -> None:
            self.times: list[float] = []
            self.flops: int | None = None
            self.counter = total_flop_counter() if count_flops else None

        def on_train_batch_start(self, *args: Any) -> None:
            if self.counter is not None and not self.times:
                self.counter.__enter__()
            self.started = time.perf_counter()

        def on_train_batch_end(self, *args: Any) -> None:
            self.times.append(time.perf_counter() - self.started)
            if self.counter is not None and len(self.times) == 1:
                self.counter.__exit__(None, None, None)
                self.flops = self.counter.get_total_flops()

    def fit(count_flops: bool) -> tuple[Timer, float]:
        timer = Timer(count_flops)
        reset_peak_rss()
        rss_before = resident_mib()
        if accelerator == "gpu":
            torch.cuda.reset_peak_memory_stats()
        trainer = L.Trainer(
            accelerator=accelerator, devices=1, max_steps=warmup + steps, precision=precision, logger=False,
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[timer],
            limit_val_batches=0, num_sanity_val_steps=0,
        )  # fmt: skip
        try:
            trainer.fit(module, train_dataloaders=SameBatch(batch_data, warmup + steps))
        except RuntimeError:
            if timer.counter is not None and not timer.times:
                timer.counter.__exit__(None, None, None)  # leave the counting mode the failed step entered
            raise
        if accelerator == "gpu":
            return timer, torch.cuda.max_memory_allocated() / 2**20
        return timer, peak_rss_mib() - rss_before  # growth of the peak resident set while this method trained

    try:
        timer, memory = fit(count_flops=True)
    except RuntimeError:  # an operation the FLOP counter cannot follow: time the step without counting
        module = apply_performance(build_module(cfg), cfg.performance)
        timer, memory = fit(count_flops=False)
    flops = timer.flops
    step_seconds = statistics.median(timer.times[warmup:])

    module.eval()
    image = datamodule.part_dataset("test")[0]["image"]
    test_batch = torch.stack([image] * batch).to(module.device)
    if channels_last:
        test_batch = test_batch.contiguous(memory_format=torch.channels_last)
    passes = inference_passes(size)
    with torch.no_grad(), torch.autocast(accelerator, dtype=torch.bfloat16, enabled=precision.startswith("bf16")):
        for _ in range(2):
            module.predict_logits(test_batch)
        started = time.perf_counter()
        for _ in range(passes):
            module.predict_logits(test_batch)
        infer_rate = passes * batch / (time.perf_counter() - started)
    return {
        "method": method, "size": size, "images_per_step": images_per_step,
        "step_ms": round(step_seconds * 1000, 1), "train_img_s": round(images_per_step / step_seconds, 1),
        "infer_img_s": round(infer_rate, 1), "gflops_per_step": round(flops / 1e9, 2) if flops else None,
        "peak_mem_mib": round(memory, 1), "num_params_train": module.num_params_train, "num_params": module.num_params,
    }  # fmt: skip


def run_in_subprocess(args: argparse.Namespace, method: str) -> list[dict]:
    command = [sys.executable, __file__, "--worker", method, "--batch", str(args.batch), "--precision",
               args.precision, "--sizes", *map(str, args.sizes), "--steps", *map(str, args.steps)]  # fmt: skip
    command += ["--channels-last", args.channels_last] * bool(args.channels_last) + ["--compile"] * args.compile
    command += [item for override in args.override for item in ("--override", override)]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        print(f"  {method}: failed\n{done.stderr[-1500:]}", file=sys.stderr)
        return []
    return [json.loads(line) for line in lines]


def run_here(args: argparse.Namespace, method: str) -> list[dict]:
    """Measure ``method`` in this process (peak memory is exact where the peak RSS can be reset)."""
    rows = []
    for size in sorted(args.sizes):
        try:
            rows.append(measure(method, size, args.batch, steps_at(args, size), args.precision, overrides(args)))
        except Exception as error:  # one broken method must not stop the benchmark
            print(f"  {method} {size}²: failed: {type(error).__name__}: {error}", file=sys.stderr)
    return rows


def performance(overrides: list[str]) -> dict:
    """The ``performance`` settings the runs use: the training config's, with ``overrides`` applied."""
    from semiseg.config import compose_config

    return dict(compose_config(overrides).performance)


def optimizer(overrides: list[str]) -> str:
    from semiseg.config import compose_config

    chosen = compose_config(overrides).optimizer
    return f"{chosen._target_.rsplit('.', 1)[-1]} fused={chosen.get('fused')}"


def inference_passes(size: int) -> int:
    """Timed inference passes at ``size``: about the same time per size (10 at 128², 3 at 256²), since one pass
    is short and its time varies more than a training step's."""
    return max(3, round(10 * (128 / size) ** 2))


def steps_at(args: argparse.Namespace, size: int) -> int:
    """Timed steps at ``size``: ``--steps`` gives one count per size (in the order of ``--sizes``) or one for all."""
    position = args.sizes.index(size)
    return args.steps[position] if position < len(args.steps) else args.steps[-1]


def overrides(args: argparse.Namespace) -> list[str]:
    return (
        [f"performance.channels_last={args.channels_last}"] * bool(args.channels_last)
        + ["performance.compile=true"] * args.compile
        + list(args.override)
    )


def table(rows: list[dict]) -> str:
    base = {r["size"]: r for r in rows if r["method"] == "supervised"}
    head = ("| method | size | train img/s | step ms | vs supervised | FLOPs vs supervised | infer img/s | "
            "infer vs supervised | peak MiB | params (train / infer) |")  # fmt: skip
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        b = base.get(r["size"])
        ratio = f"{r['step_ms'] / b['step_ms']:.2f}" if b else "-"
        known = b and b["gflops_per_step"] and r["gflops_per_step"]
        flops = f"{r['gflops_per_step'] / b['gflops_per_step']:.2f}" if known else "-"
        infer = f"{b['infer_img_s'] / r['infer_img_s']:.2f}" if b else "-"
        lines.append(
            f"| {r['method']} | {r['size']}² | {r['train_img_s']} | {r['step_ms']} | {ratio} | {flops} | "
            f"{r['infer_img_s']} | {infer} | {r['peak_mem_mib']} | {r['num_params_train']:,} / {r['num_params']:,} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="all", help="comma-separated method names, or 'all'")
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--batch", type=int, default=8, help="labeled and unlabeled batch size each")
    parser.add_argument(
        "--steps", type=int, nargs="+", default=[2, 1], help="timed steps after 1 warm-up step, per size or one for all"
    )
    parser.add_argument("--precision", default="32-true", help="Lightning precision, e.g. bf16-mixed")
    parser.add_argument(
        "--channels-last", choices=["true", "false"], help="override performance.channels_last (default: the config's)"
    )
    parser.add_argument("--compile", action="store_true", help="torch.compile the networks")
    parser.add_argument("--override", action="append", default=[], help="a Hydra override of the training config")
    parser.add_argument("--out", default="methods", help="name of the output files under bench_out/")
    parser.add_argument("--isolate", action="store_true", help="one process per method (slower start-up)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()

    import warnings

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    if args.worker:
        for size in sorted(args.sizes):
            row = measure(args.worker, size, args.batch, steps_at(args, size), args.precision, overrides(args))
            print(json.dumps(row), flush=True)
        return

    import torch

    methods = all_methods() if args.methods == "all" else args.methods.split(",")
    if "supervised" not in methods:
        methods.insert(0, "supervised")
    machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
               f"{'CUDA ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU'}")  # fmt: skip
    settings = f"batch {args.batch} + {args.batch}, precision {args.precision}, "
    settings += f"performance {performance(overrides(args))}, optimizer {optimizer(overrides(args))}, "
    settings += f"timed steps {dict(zip(args.sizes, (steps_at(args, s) for s in args.sizes), strict=True))} (median), "
    settings += "1 warm-up step"
    print(f"# {machine}\n# {settings}", flush=True)
    started = time.perf_counter()
    rows: list[dict] = []
    for method in methods:
        new = run_in_subprocess(args, method) if args.isolate else run_here(args, method)
        for row in new:
            print(f"  {row['method']:<16} {row['size']}²  {row['train_img_s']:>7} img/s train  "
                  f"{row['infer_img_s']:>7} img/s infer  {row['gflops_per_step'] or '-':>8} GFLOP/step")  # fmt: skip
        rows += new
    rows.sort(key=lambda r: (r["size"], r["method"] != "supervised", r["method"]))
    text = f"{machine}; {settings}\n\n{table(rows)}\n"
    OUT.mkdir(exist_ok=True)
    (OUT / f"{args.out}.md").write_text(text)
    summary = {"machine": machine, "settings": settings, "rows": rows}
    (OUT / f"{args.out}.json").write_text(json.dumps(summary, indent=1))
    print("\n" + table(rows))
    print(f"\n{len(methods)} methods in {time.perf_counter() - started:.0f} s -> {OUT / (args.out + '.md')}")


if __name__ == "__main__":
    main()
