"""Which local launcher finishes a CPU sweep sooner (a benchmark, not a test).

    python benchmarks/sweep_throughput.py [--jobs 4] [--steps 100] [--method supervised] [--set key=value ...]
                                          [--launchers basic joblib] [--out NAME]

Runs the same multirun of ``--jobs`` jobs (seeds 0..jobs-1 of one method on the default synthetic set, ``--steps``
steps each) with the real command line, ``python -m semiseg.train -m``, once per launcher:

* ``basic``: Hydra's default launcher, one job after the other, each with every core (``num_threads=auto``);
* ``joblib``: ``hydra/launcher=joblib hydra.launcher.n_jobs=<cores>``, that many jobs at once, each with
  ``cores / n_jobs`` threads (``num_threads=auto`` divides them).

Prints each sweep's wall clock and jobs per hour, and which is faster; writes ``bench_out/<out>.json``. The sweep
folders go to ``bench_out/sweep_throughput/``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def launcher_overrides(launcher: str, cores: int) -> list[str]:
    if launcher == "basic":
        return []
    return ["hydra/launcher=joblib", f"hydra.launcher.n_jobs={cores}"]


def sweep(launcher: str, jobs: int, steps: int, method: str, extra: list[str], out: Path, cores: int) -> dict:
    folder = out / launcher
    shutil.rmtree(folder, ignore_errors=True)
    command = [
        sys.executable, "-m", "semiseg.train", "-m", f"method={method}", f"seed={','.join(map(str, range(jobs)))}",
        f"trainer.max_steps={steps}", "logger=csv", f"hydra.sweep.dir={folder}", *extra,
        *launcher_overrides(launcher, cores),
    ]  # fmt: skip
    started = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"{launcher} sweep failed ({done.returncode}):\n{done.stderr[-3000:]}")
    finished = len(list(folder.rglob("results.json")))
    if finished != jobs:
        sys.exit(f"{launcher} sweep: {finished} of {jobs} jobs wrote results.json (see {folder})")
    return {"launcher": launcher, "command": " ".join(command[1:]), "seconds": round(seconds, 1),
            "jobs_per_hour": round(3600 * jobs / seconds, 1)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=4)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--method", default="supervised")
    parser.add_argument("--launchers", nargs="+", choices=["basic", "joblib"], default=["basic", "joblib"])
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for every job")
    parser.add_argument("--out", default="sweep_throughput")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    out = ROOT / "bench_out" / args.out
    out.mkdir(parents=True, exist_ok=True)
    print(f"{args.jobs} jobs of {args.method}, {args.steps} steps each, {cores} cores, overrides {args.set or 'none'}")
    rows = []
    for launcher in args.launchers:
        row = sweep(launcher, args.jobs, args.steps, args.method, args.set, out, cores)
        rows.append(row)
        print(f"  {launcher:<7} {row['seconds']:8.1f} s  {row['jobs_per_hour']:6.1f} jobs/h", flush=True)
    if len(rows) > 1:
        fastest = min(rows, key=lambda r: r["seconds"])
        slowest = max(rows, key=lambda r: r["seconds"])
        print(f"faster: {fastest['launcher']} ({slowest['seconds'] / fastest['seconds']:.2f}x)")
    figures = {"jobs": args.jobs, "steps": args.steps, "method": args.method, "set": args.set, "cores": cores,
               "cpu": platform.processor() or platform.machine(), "results": rows}  # fmt: skip
    (ROOT / "bench_out" / f"{args.out}.json").write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
