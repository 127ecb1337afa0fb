"""The measured tables of experiments/evidence/README.md, from the committed report and run records alone.

    python experiments/evidence/tables.py [--write]

Reads ``report/runs.csv``, ``report/paired.csv``, ``report/curves.csv`` and ``runs.jsonl`` (for the threads of
each run) beside this file and prints, as Markdown: every run with both metric conventions, its best validation
and wall-clock; mean ± sample std per method; the seed-paired differences against supervised; the diagnostics at
steps 1,000 / 2,000 / 3,000. ``--write`` replaces the block between ``<!-- tables:begin -->`` and
``<!-- tables:end -->`` in the README instead of printing. Nothing here computes a statistic of its own: every
figure is read from the report (``python -m semiseg.report``), so the README cannot drift from it.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
BEGIN, END = "<!-- tables:begin -->", "<!-- tables:end -->"
METHOD_ORDER = ("supervised", "uaps", "mean_teacher", "fixmatch", "cps", "unimatch")
METHOD_NAMES = {
    "supervised": "supervised",
    "uaps": "UAPS",
    "mean_teacher": "Mean Teacher",
    "fixmatch": "FixMatch",
    "cps": "CPS",
    "unimatch": "UniMatch",
}
DIAGNOSTIC_STEPS = (1000, 2000, 3000)
METRICS = ("test/mIoU", "test/mIoU_image", "test/mDice", "test/mDice_image")


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def method_key(method: str) -> tuple[int, str]:
    return (METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER), method)


def name(method: str) -> str:
    return METHOD_NAMES.get(method, method)


def threads_of_runs(records: Path) -> dict[tuple[str, int], str]:
    """``(method, seed)`` -> torch threads of the run (``num_threads`` override; absent: both cores)."""
    threads = {}
    for line in records.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            results = record["results"]
            threads[(results["method"], int(results["seed"]))] = record.get("overrides", {}).get("num_threads", "2")
    return threads


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    """Lines of a Markdown table."""
    return [f"| {' | '.join(header)} |", "|" + "---|" * len(header), *(f"| {' | '.join(row)} |" for row in rows)]


def runs_table(runs: list[dict[str, str]], threads: dict[tuple[str, int], str]) -> list[str]:
    header = ["run", "test mIoU", "test mIoU_image", "test mDice", "test mDice_image", "best val mIoU (step)"]
    rows = []
    for run in sorted(runs, key=lambda r: (method_key(r["method"]), int(r["seed"]))):
        seed = int(run["seed"])
        rows.append([
            f"{name(run['method'])}, seed {seed}",
            *(f"{float(run[metric]):.4f}" for metric in METRICS),
            f"{float(run['best_val']):.4f} ({int(run['best_val_step']):,})",
            f"{float(run['train_seconds']):,.0f}",
            threads.get((run["method"], seed), "?"),
        ])  # fmt: skip
    return markdown_table([*header, "train s", "threads"], rows)


def summary_table(runs: list[dict[str, str]]) -> list[str]:
    by_method: dict[str, list[dict[str, str]]] = defaultdict(list)
    for run in runs:
        by_method[run["method"]].append(run)
    rows = []
    for method in sorted(by_method, key=method_key):
        group = by_method[method]
        cells = []
        for metric in ("test/mIoU", "test/mIoU_image"):
            values = [float(run[metric]) for run in group]
            spread = f" ± {statistics.stdev(values):.4f}" if len(values) > 1 else ""
            cells.append(f"{statistics.mean(values):.4f}{spread}")
        seconds = statistics.median(float(run["train_seconds"]) for run in group)
        seeds = ",".join(str(s) for s in sorted(int(run["seed"]) for run in group))
        rows.append([name(method), f"{len(group)} ({seeds})", *cells, f"{seconds:,.0f}"])
    return markdown_table(["method", "seeds", "test mIoU", "test mIoU_image", "median train s"], rows)


def paired_table(paired: list[dict[str, str]]) -> list[str]:
    rows = []
    for row in sorted(paired, key=lambda r: method_key(r["method"])):
        pairs = int(row["n_pairs"])
        delta = float(row["mean_delta"])
        excludes_zero = bool(row["ci_low"]) and (float(row["ci_low"]) > 0 or float(row["ci_high"]) < 0)
        interval = f"[{float(row['ci_low']):+.4f}, {float(row['ci_high']):+.4f}]" if row["ci_low"] else "n/a"
        boot = f"{float(row['boot_delta']):+.4f} [{float(row['boot_ci_low']):+.4f}, {float(row['boot_ci_high']):+.4f}]"
        rows.append([
            name(row["method"]),
            str(pairs),
            f"**{delta:+.4f}**" if excludes_zero else f"{delta:+.4f}",
            interval,
            f"{float(row['p_value']):.4f} [{2 / 2**pairs:.4f}]",
            boot,
        ])  # fmt: skip
    header = ["method − supervised", "pairs", "Δ test mIoU", "95 % t interval", "p (sign-flip) [floor]"]
    return markdown_table([*header, "Δ mIoU_image, image bootstrap [95 %]"], rows)


def diagnostics_table(curves: list[dict[str, str]]) -> list[str]:
    values: dict[tuple[str, str, int], tuple[float, float, int]] = {}
    for row in curves:
        values[(row["row"], row["key"], int(row["step"]))] = (float(row["mean"]), float(row["std"]), int(row["n"]))
    methods = sorted({row["row"] for row in curves}, key=method_key)
    keys = (
        ("val/mIoU", "val mIoU"),
        ("diag/pseudo_label_mIoU", "pseudo-label mIoU (used pixels)"),
        ("diag/unsup_pixel_share", "share of pixels used"),
    )
    rows = []
    for method in methods:
        for key, label in keys:
            cells = []
            for step in DIAGNOSTIC_STEPS:
                if (method, key, step) not in values:
                    cells.append("–")
                    continue
                mean, std, count = values[(method, key, step)]
                cells.append(f"{mean:.3f} ± {std:.3f} (n={count})" if count > 1 else f"{mean:.3f} (n=1)")
            if any(cell != "–" for cell in cells):
                rows.append([name(method), label, *cells])
    return markdown_table(["method", "quantity", *(f"step {step:,}" for step in DIAGNOSTIC_STEPS)], rows)


def tables() -> str:
    report = HERE / "report"
    runs = read_csv(report / "runs.csv")
    threads = threads_of_runs(HERE / "runs.jsonl")
    parts = [
        "Every run ([`report/runs.csv`](report/runs.csv); `train s`: wall-clock of the training, validations "
        "included, of all attempts of a resumed run):",
        "",
        *runs_table(runs, threads),
        "",
        "Per method, mean ± sample std over seeds:",
        "",
        *summary_table(runs),
        "",
        "Paired by seed against supervised ([`report/paired.csv`](report/paired.csv)); bold only where the 95 % "
        "t interval excludes 0; the floor is the smallest p-value the sign-flip test can give with that many "
        "pairs (2/2^n); the bootstrap resamples the 840 test images of the paired seeds and speaks to image "
        "sampling only, not to seed-to-seed variance:",
        "",
        *paired_table(read_csv(report / "paired.csv")),
        "",
        "Diagnostics ([`report/curves.csv`](report/curves.csv); mean ± std over the seeds that logged them, `n`; "
        "pseudo-labels of 64 fixed unlabeled images against their hidden masks, for supervised its own "
        "prediction):",
        "",
        *diagnostics_table(read_csv(report / "curves.csv")),
    ]
    return "\n".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="replace the tables block of the README")
    args = parser.parse_args()
    text = tables()
    if not args.write:
        print(text)
        return
    readme = HERE / "README.md"
    content = readme.read_text()
    if BEGIN not in content or END not in content:
        raise SystemExit(f"{readme}: no '{BEGIN}' ... '{END}' block to replace; add the two markers first")
    head, rest = content.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    temporary = readme.with_suffix(".md.tmp")
    temporary.write_text(f"{head}{BEGIN}\n{text}\n{END}{tail}")
    temporary.replace(readme)


if __name__ == "__main__":
    main()
