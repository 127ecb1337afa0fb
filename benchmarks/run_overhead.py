"""How much of a whole run is spent outside its optimisation steps (a benchmark, not a test).

    python benchmarks/run_overhead.py [--steps 200] [--variants defaults no_validation no_logging workers_0]
                                      [--set key=value ...] [--out NAME]

Runs the real training command (``semiseg.runner.fit_and_test``, the path of ``python -m semiseg.train``) for
``--steps`` steps, once per variant, each in its own folder under ``bench_out/run_overhead/``, and prints from
the run's ``wall_clock.json`` (``semiseg.callbacks.WallClock``): the fit's wall clock, the time inside the
optimisation steps, in validation and in the rest (loading, logging, checkpoints), the share of the fit outside
the steps, and the whole run's wall clock (setup, fit and test). ``--set`` adds overrides to every variant
(e.g. ``--set dataset=neu dataset.image_size=[64,64]``). Variants:

* ``defaults``: the configuration as it is (the target: at most 15 % outside the steps);
* ``no_validation``: one validation, at the end (``trainer.val_check_interval`` = the budget);
* ``no_logging``: no logger, no progress bar (``logger=none``, ``callbacks.progress_bar.log_every_n_steps`` = the
  budget);
* ``workers_0``: loading in the main process (``data.num_workers=0``);
* ``workers_1``: one loader worker (``data.num_workers=1``).

Results also go to ``bench_out/<out>.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from semiseg.config import compose_config  # noqa: E402
from semiseg.runner import fit_and_test  # noqa: E402

VARIANTS = {
    "defaults": lambda steps: [],
    "no_validation": lambda steps: [f"trainer.val_check_interval={steps}"],
    "no_logging": lambda steps: ["logger=none", f"callbacks.progress_bar.log_every_n_steps={steps}"],
    "workers_0": lambda steps: ["data.num_workers=0"],
    "workers_1": lambda steps: ["data.num_workers=1"],
}


def run(variant: str, steps: int, extra: list[str], out: Path) -> dict:
    """One whole run of ``variant``; its wall-clock breakdown and the whole run's seconds."""
    run_dir = out / variant
    shutil.rmtree(run_dir, ignore_errors=True)
    overrides = [f"trainer.max_steps={steps}", *extra, *VARIANTS[variant](steps)]
    cfg = compose_config(overrides, output_dir=run_dir)
    started = time.perf_counter()
    results = fit_and_test(cfg, run_dir, results_file="results.json")
    whole = time.perf_counter() - started
    figures = json.loads((run_dir / "wall_clock.json").read_text())
    return {"variant": variant, "overrides": overrides, "run_seconds": round(whole, 3),
            "test_mIoU": results["metrics"].get("test/mIoU"), **figures}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for every variant")
    parser.add_argument("--out", default="run_overhead")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    out = ROOT / "bench_out" / args.out
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    print(f"{args.steps} steps, overrides {args.set or 'none'}, {torch.get_num_threads()} torch threads")
    print("variant        run s    fit s   steps s  valid s   rest s  outside steps  ms/step")
    for variant in args.variants:
        row = run(variant, args.steps, args.set, out)
        rows.append(row)
        print(
            f"{variant:<13} {row['run_seconds']:7.1f} {row['fit_seconds']:8.1f} {row['step_seconds']:8.1f} "
            f"{row['validation_seconds']:8.1f} {row['other_seconds']:8.1f} {100 * row['share_outside_steps']:12.1f} % "
            f"{1000 * row['step_seconds'] / max(1, row['steps']):8.1f}",
            flush=True,
        )
    figures = {"steps": args.steps, "set": args.set, "torch": torch.__version__, "cpu_count": os.cpu_count(),
               "cpu": platform.processor() or platform.machine(), "results": rows}  # fmt: skip
    (ROOT / "bench_out" / f"{args.out}.json").write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
