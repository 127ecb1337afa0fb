"""Mean ± std of test mIoU per (method, labeled ratio) over every results.json under a directory.

python experiments/comparison/table.py outputs/comparison_cpu/multirun/<time>
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def main(root: str) -> None:
    rows: dict[tuple[str, float], list[float]] = {}
    for path in sorted(Path(root).rglob("results.json")):
        result = json.loads(path.read_text())
        rows.setdefault((result["method"], result["labeled_ratio"]), []).append(result["metrics"]["test/mIoU"])
    print(f"{'method':14s} {'ratio':>5s}  {'test mIoU':>9s}  {'std':>6s}  n")
    for (method, ratio), values in sorted(rows.items()):
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        print(f"{method:14s} {ratio:5.1f}  {statistics.mean(values):9.4f}  {spread:6.4f}  {len(values)}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "outputs")
