"""Add one finished run of the evidence sweep to the committed tables (the run directory itself stays outside).

    python experiments/evidence/collect.py RUN_DIR [RUN_DIR ...]

Tables, beside this file (a run already in ``runs.csv`` is replaced, so collecting twice is harmless):
- ``runs.csv``: one row per run: method, seed, test metrics (both conventions), best validation and its step,
  steps and train_seconds;
- ``curves.csv``: the validation curve of each run: method, seed, step, val/mIoU and the diagnostics;
- ``per_image_mIoU.csv``: each test image's ``mIoU_image`` per run (the paired bootstrap's input).
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RUN_COLUMNS = ["method", "seed", "test/mIoU", "test/mIoU_image", "test/mDice", "test/mDice_image",
               "best_val_mIoU", "best_val_step", "steps", "train_seconds"]  # fmt: skip
CURVE_KEYS = ["val/mIoU", "val/mIoU_image", "diag/pseudo_label_mIoU", "diag/unsup_pixel_share"]


def read_rows(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def write_rows(path: Path, columns: list[str], rows: list[dict[str, object]]) -> None:
    temporary = path.with_suffix(".tmp")
    with open(temporary, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    temporary.replace(path)


def replace_run(path: Path, columns: list[str], method: str, seed: str, new: list[dict[str, object]]) -> None:
    kept = [row for row in read_rows(path) if (row["method"], row["seed"]) != (method, seed)]
    write_rows(path, columns, [*kept, *new])


def collect(run_dir: Path) -> None:
    results = json.loads((run_dir / "results.json").read_text())
    method, seed = str(results["method"]), str(results["seed"])
    metrics, best = results["metrics"], results["best_val"]
    run = {"method": method, "seed": seed, **{k: metrics.get(k) for k in RUN_COLUMNS if k.startswith("test/")},
           "best_val_mIoU": best["value"], "best_val_step": best["step"], "steps": results["steps"],
           "train_seconds": results["train_seconds"]}  # fmt: skip
    replace_run(HERE / "runs.csv", RUN_COLUMNS, method, seed, [run])
    curve = [
        {"method": method, "seed": seed, "step": int(row["step"]) + 1, **{k: row.get(k, "") for k in CURVE_KEYS}}
        for row in read_rows(run_dir / "csv" / "metrics.csv")
        if row.get("val/mIoU")
    ]  # Lightning logs a validation at step k-1 for the k-th optimisation step
    replace_run(HERE / "curves.csv", ["method", "seed", "step", *CURVE_KEYS], method, seed, curve)
    images = [{"method": method, "seed": seed, "id": row["id"], "mIoU_image": row["mIoU_image"]}
              for row in read_rows(run_dir / "per_image.csv")]  # fmt: skip
    replace_run(HERE / "per_image_mIoU.csv", ["method", "seed", "id", "mIoU_image"], method, seed, images)
    print(f"collected {method} seed {seed}: test/mIoU {metrics.get('test/mIoU')}")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    for argument in sys.argv[1:]:
        collect(Path(argument))
