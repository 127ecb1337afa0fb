"""Why a strategy wins or loses: the defect classes and defect share of the NEU-Seg images each strategy
revealed, and the per-class test IoU of each strategy's last finished round.

    SEMISEG_DATA_DIR=/path/holding/NEU_data python experiments/active_learning/picked_classes.py SWEEP_DIR

SWEEP_DIR holds the active-learning runs (``seed=<s>/active_learning.csv`` and ``<strategy>/round_<r>/results.json``).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ("inclusion", "patches", "scratches")  # NEU-Seg's mask values 1, 2, 3


def picked_stats(annotations: Path, ids: list[str]) -> tuple[list[int], float]:
    """How many picked images hold each defect class, and their mean defect pixel share."""
    counts = np.zeros(len(CLASSES) + 1, dtype=int)
    shares = []
    for sample_id in ids:
        mask = np.asarray(Image.open(annotations / f"{sample_id}.png"))
        present = np.unique(mask)
        counts[present[present > 0]] += 1
        shares.append(float((mask > 0).mean()))
    return counts[1:].tolist(), float(np.mean(shares)) if shares else float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep", type=Path)
    args = parser.parse_args()
    data_dir = os.environ.get("SEMISEG_DATA_DIR")
    if not data_dir or not (Path(data_dir) / "NEU_data" / "annotations").is_dir():
        print("error: set SEMISEG_DATA_DIR to the folder holding NEU_data (NEU_data/annotations/...)", file=sys.stderr)
        return 2
    annotations = Path(data_dir) / "NEU_data" / "annotations"
    for run in sorted(path.parent for path in args.sweep.rglob("active_learning.csv")):
        with open(run / "active_learning.csv", newline="") as file:
            rows = list(csv.DictReader(file))
        for strategy in sorted({row["strategy"] for row in rows}):
            picked = [i for row in rows if row["strategy"] == strategy for i in row["picked"].split()]
            counts, share = picked_stats(annotations, picked)
            finished = sorted(p for p in (run / strategy).glob("round_*") if (p / "results.json").is_file())
            iou = json.loads((finished[-1] / "results.json").read_text())["metrics"] if finished else {}
            per_class = " ".join(f"{c} {iou.get(f'test/IoU/{c}', float('nan')):.3f}" for c in CLASSES)
            print(f"{run.name} {strategy:8s} picked {len(picked):3d}: images holding "
                  f"{'/'.join(CLASSES)} {counts}, mean defect share {share:.3f}; "
                  f"{finished[-1].name if finished else '-'} test IoU {per_class}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
