"""The comparison report: ``python -m semiseg.report DIR... [--out OUT] [--metric test/mIoU]``.

Reads every ``results.json`` under the given folders (one or several multiruns, or single runs) and writes
into ``DIR/report/`` (``--out`` to change):

* ``table.md`` and ``table.csv`` — rows = method (plus its variant, see below), columns = dataset ×
  labeled ratio, cells = mean ± sample standard deviation of the metric over seeds, with the number of
  seeds ``(n)``; the best mean of each column is in bold (Markdown) / starred (CSV). ``cells.csv`` holds
  the same numbers one cell per line.
* ``ratio_<dataset>.png`` — the metric against the labeled ratio, one line per method, error bars = std.
* ``ablation_<key>.png`` — for every config key that a sweep varied besides method, dataset, ratio and
  seed (decoder counts, loss terms, coefficients, mixing, ...): the metric against that key's values,
  one line per method × dataset × ratio, as in the UAPS paper's ablation figures.
* ``paired.csv`` and a section of ``table.md`` / ``index.html`` — every method against ``supervised`` on the
  same dataset, ratio, split and budget: the seed-paired difference of the metric (pairs, mean, 95 % t interval,
  exact sign-flip permutation p-value, whose floor 2/2^n is printed beside it) and a paired bootstrap over test
  images of ``mIoU_image`` from the runs' ``per_image.csv`` (pooled over the paired seeds).
* ``curve_<key>_<dataset>_r<ratio>.png`` and ``curves.csv`` — validation curves against the step (the monitored
  metric and the ``diag/`` diagnostics, read from a run's ``csv/metrics.csv``): mean ± std over seeds, one line per
  method, per dataset, ratio and protocol.
* ``runs.csv`` — one row per run: identity, the metric, the per-image convention, best validation, steps and
  ``train_seconds`` (the wall clock of the run).
* ``index.html`` — all of it on one page.

Runs can also come from *records*: ``--save-records FILE.jsonl`` writes one JSON line per run read (its
``results.json``, overrides, budget, per-image scores and validation curves) and a ``.jsonl`` file (or a
``runs.jsonl`` found in a folder) is read back as those runs, so a sweep that spans sittings keeps a small
committed file instead of run directories: ``python -m semiseg.report records.jsonl NEW_RUN_DIR --save-records
records.jsonl``. A run found twice (same method, variant, dataset, ratio, seed and protocol) counts once: the one
given later wins.

A run's *variant* is the set of its command-line overrides (``.hydra/overrides.yaml``) other than
method, dataset, ratio, seed and keys that do not change results (paths, logger, threads, resume); runs
with different variants get different rows. A cell only averages runs of one *protocol* — the same split
(``split_seed`` and part sizes) and the same budget (``trainer.max_steps``); mixing protocols is refused
with a message naming the runs.
"""

from __future__ import annotations

import argparse
import csv
import html
import io
import json
import logging
import math
import statistics
import sys
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from semiseg.errors import SemiSegError, exit_on_user_error
from semiseg.io import atomic_write_text
from semiseg.results import CONFIG_FILE, PER_IMAGE_FILE, RESULTS_FILE

log = logging.getLogger("semiseg.report")

REQUIRED_RESULTS = {"method", "dataset", "labeled_ratio", "seed", "metrics"}
RECORDS_SUFFIX = ".jsonl"
RECORDS_FILE = "runs.jsonl"  # a records file found in a folder
METRICS_LOG = Path("csv") / "metrics.csv"  # the CSV logger's file in a run dir
CURVE_PREFIXES = ("val/", "diag/")

# overrides that name the cell (method, dataset, ratio) or the repetition (seed), or change no result
IDENTITY_KEYS = {"method", "dataset", "labeled_ratio", "seed"}
PROTOCOL_KEYS = {"split_seed", "trainer.max_steps", "split_file"}
NEUTRAL_PREFIXES = (
    "hydra", "paths.", "logger", "resume", "sweep_name", "num_threads", "data.num_workers", "callbacks",
    "trainer.devices", "trainer.num_nodes", "trainer.accelerator", "trainer.enable_", "trainer.log_every",
    "ckpt_path", "experiment_tag",
)  # fmt: skip
ABLATION_KINDS = (
    ("decoders", ("decoder",)),
    ("mixing", ("mixing", "cutmix", "mix")),
    ("loss terms", ("uncertainty", "use_", "loss.", "_loss", "weighting", "terms")),
    ("coefficients", ("weight", "coef", "lambda", "alpha", "beta", "threshold", "temperature", "ramp")),
)


class ReportError(SemiSegError, ValueError):
    """The results cannot be reported as asked (none found, or protocols mixed in one cell)."""


@dataclass
class Run:
    """One finished run: where it is, its results and the overrides it was started with."""

    path: Path
    results: dict[str, Any]
    overrides: dict[str, str] = field(default_factory=dict)
    max_steps: int | None = None
    shown: frozenset[str] | None = None  # variant keys that differ between the reported runs
    per_image: dict[str, float] | None = None  # id -> mIoU_image when read from records (else from per_image.csv)
    curves: dict[str, list[tuple[int, float]]] | None = None  # key -> (step, value) when read from records

    @property
    def method(self) -> str:
        return str(self.results["method"])

    @property
    def dataset(self) -> str:
        return str(self.results["dataset"])

    @property
    def ratio(self) -> float:
        return float(self.results["labeled_ratio"])

    @property
    def seed(self) -> int:
        return int(self.results["seed"])

    @property
    def variant(self) -> tuple[tuple[str, str], ...]:
        return tuple(
            sorted(
                (k, v)
                for k, v in self.overrides.items()
                if is_variant_key(k) and (self.shown is None or k in self.shown)
            )
        )

    @property
    def row(self) -> str:
        variant = self.variant
        return self.method + (f" ({', '.join(f'{k}={v}' for k, v in variant)})" if variant else "")

    @property
    def protocol(self) -> tuple[Any, ...]:
        split = self.results.get("split") or {}
        budget = self.max_steps if self.max_steps is not None else self.results.get("steps")
        return (
            int(self.results.get("split_seed", 0)),
            tuple(sorted(split.items())),
            budget,
            self.overrides.get("split_file"),
        )

    def describe_protocol(self) -> str:
        split_seed, split, budget, split_file = self.protocol
        sizes = ", ".join(f"{k}={v}" for k, v in split)
        extra = f", split_file={split_file}" if split_file else ""
        return f"split_seed={split_seed}, split ({sizes}), budget={budget} steps{extra}"

    def metric(self, name: str) -> float | None:
        value = self.results.get("metrics", {}).get(name)
        return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)

    @property
    def key(self) -> tuple[Any, ...]:
        """What makes two runs the same run: method, every variant override, dataset, ratio, seed, protocol."""
        variant = tuple(sorted((k, v) for k, v in self.overrides.items() if is_variant_key(k)))
        return (self.method, variant, self.dataset, self.ratio, self.seed, self.protocol)

    def per_image_scores(self) -> dict[str, float] | None:
        """``id -> mIoU_image`` of the test images (``None`` when the run wrote no ``per_image.csv``)."""
        if self.per_image is not None:
            return self.per_image
        return read_per_image(self.path) if (self.path / PER_IMAGE_FILE).is_file() else None

    def validation_curves(self) -> dict[str, list[tuple[int, float]]]:
        """``key -> [(step, value), ...]`` of every ``val/`` and ``diag/`` key the run's CSV log holds; the step is
        the number of optimisation steps done (Lightning logs a validation after step k at index k - 1)."""
        if self.curves is not None:
            return self.curves
        return read_curves(self.path / METRICS_LOG)


def is_variant_key(key: str) -> bool:
    key = key.lstrip("+~")
    if key in IDENTITY_KEYS or key in PROTOCOL_KEYS:
        return False
    return not key.startswith(NEUTRAL_PREFIXES)


def _parse_overrides(lines: Iterable[str]) -> dict[str, str]:
    parsed = {}
    for line in lines:
        key, _, value = str(line).partition("=")
        parsed[key.lstrip("+~")] = value
    return parsed


def load_run(results_path: Path) -> Run | None:
    """A :class:`Run` from ``results.json`` and what lies next to it (``None`` if unreadable)."""
    try:
        results = json.loads(results_path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        log.warning("skipping %s: %s", results_path, error)
        return None
    if not isinstance(results, dict) or not set(results) >= REQUIRED_RESULTS:
        log.warning("skipping %s: not a semiseg results.json", results_path)
        return None
    run_dir = results_path.parent
    overrides: dict[str, str] = {}
    overrides_file = run_dir / ".hydra" / "overrides.yaml"
    if overrides_file.is_file():
        overrides = _parse_overrides(yaml.safe_load(overrides_file.read_text()) or [])
    elif isinstance(results.get("overrides"), list):
        overrides = _parse_overrides(results["overrides"])
    max_steps = None
    config_file = run_dir / str(results.get("config") or CONFIG_FILE)
    if config_file.is_file():
        config = yaml.safe_load(config_file.read_text()) or {}
        max_steps = (config.get("trainer") or {}).get("max_steps")
    return Run(results_path.parent, results, overrides, max_steps)


def read_curves(path: Path) -> dict[str, list[tuple[int, float]]]:
    """The ``val/`` and ``diag/`` columns of a Lightning CSV log, as ``key -> [(step + 1, value), ...]``."""
    if not path.is_file():
        return {}
    curves: dict[str, list[tuple[int, float]]] = defaultdict(list)
    with path.open(newline="") as handle:
        for row in csv.DictReader(handle):
            for key, value in row.items():
                if key and key.startswith(CURVE_PREFIXES) and value not in ("", None) and row.get("step"):
                    curves[key].append((int(row["step"]) + 1, float(value)))
    return dict(curves)


def run_record(run: Run) -> dict[str, Any]:
    """One run as a JSON-able record: everything the report uses, so the run directory need not be kept."""
    return {
        "results": run.results,
        "overrides": run.overrides,
        "max_steps": run.max_steps,
        "per_image": run.per_image_scores(),
        "curves": {key: [list(point) for point in points] for key, points in run.validation_curves().items()},
        "source": str(run.path),
    }


def load_records(path: Path) -> list[Run]:
    """The runs of a records file written by ``--save-records`` (one JSON object per line)."""
    runs = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            results = record["results"]
            if not set(results) >= REQUIRED_RESULTS:
                raise KeyError(sorted(REQUIRED_RESULTS - set(results)))
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise ReportError(
                f"{path}, line {number}: not a semiseg run record ({error!r}); records files are written by "
                "python -m semiseg.report ... --save-records FILE.jsonl"
            ) from error
        curves = {key: [(int(s), float(v)) for s, v in points] for key, points in (record.get("curves") or {}).items()}
        per_image = record.get("per_image")
        runs.append(
            Run(Path(record.get("source") or path), results, dict(record.get("overrides") or {}),
                record.get("max_steps"), per_image=None if per_image is None else dict(per_image), curves=curves)
        )  # fmt: skip
    return runs


def save_records(runs: Sequence[Run], path: Path) -> None:
    """Write ``runs`` to the records file ``path`` (atomically: an interrupted write leaves the old file)."""
    ordered = sorted(runs, key=lambda r: (r.method, r.dataset, r.ratio, r.seed, str(r.variant)))
    atomic_write_text(path, "".join(json.dumps(run_record(run), sort_keys=True) + "\n" for run in ordered))


def unique_runs(runs: Sequence[Run]) -> list[Run]:
    """``runs`` with each run (:attr:`Run.key`) once: a later one replaces an earlier one."""
    by_key: dict[tuple[Any, ...], Run] = {}
    for run in runs:
        if run.key in by_key:
            log.info("%s replaces %s (the same run)", run.path, by_key[run.key].path)
        by_key[run.key] = run
    return list(by_key.values())


def mark_varying_keys(runs: Sequence[Run]) -> dict[str, str]:
    """Show only the variant keys whose values differ between ``runs``; return the common ones."""
    keys = {k for run in runs for k in run.overrides if is_variant_key(k)}
    varying = frozenset(k for k in keys if len({run.overrides.get(k) for run in runs}) > 1)
    for run in runs:
        run.shown = varying
    return {k: runs[0].overrides[k] for k in sorted(keys - varying)}


def find_runs(folders: Sequence[Path]) -> list[Run]:
    runs = []
    for folder in folders:
        folder = Path(folder)
        if not folder.exists():
            raise ReportError(f"{folder} does not exist; give the folder of a run or a multirun")
        if folder.is_file() and folder.suffix == RECORDS_SUFFIX:
            runs.extend(load_records(folder))
            continue
        paths = [folder] if folder.is_file() else sorted(folder.rglob(RESULTS_FILE))
        runs.extend(run for path in paths if (run := load_run(path)) is not None)
        if folder.is_dir():
            for records in sorted(folder.rglob(RECORDS_FILE)):
                runs.extend(load_records(records))
    runs = unique_runs(runs)
    if not runs:
        raise ReportError(
            f"no results.json under {', '.join(map(str, folders))}; give the folder of a finished run or multirun"
        )
    return runs


@dataclass
class Cell:
    values: list[float]
    runs: list[Run]

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    @property
    def std(self) -> float | None:
        """Sample standard deviation over seeds (``None`` for a single seed)."""
        return statistics.stdev(self.values) if len(self.values) > 1 else None


def build_cells(runs: Sequence[Run], metric: str) -> dict[tuple[str, str, float], Cell]:
    """``(row, dataset, ratio) -> Cell``; refuses cells that mix protocols."""
    grouped: dict[tuple[str, str, float], list[Run]] = defaultdict(list)
    for run in runs:
        if run.metric(metric) is None:
            log.warning("%s has no %s; left out", run.path, metric)
            continue
        grouped[(run.row, run.dataset, run.ratio)].append(run)
    for (row, dataset, ratio), members in grouped.items():
        protocols: dict[tuple, list[Run]] = defaultdict(list)
        for run in members:
            protocols[run.protocol].append(run)
        if len(protocols) > 1:
            lines = [
                f"  {group[0].describe_protocol()}: {', '.join(str(r.path) for r in group)}"
                for group in protocols.values()
            ]
            raise ReportError(
                f"refusing to average runs of different protocols in one cell ({row}, {dataset}, "
                f"labeled_ratio={ratio}):\n" + "\n".join(lines) + "\nreport these folders separately, or rerun "
                "them with the same split (split_seed, dataset fractions) and budget (trainer.max_steps)"
            )
        seeds = [run.seed for run in members]
        if len(set(seeds)) != len(seeds):
            duplicates = sorted({s for s in seeds if seeds.count(s) > 1})
            log.warning("(%s, %s, %s): seed(s) %s appear more than once", row, dataset, ratio, duplicates)
    return {key: Cell([run.metric(metric) for run in members], members) for key, members in grouped.items()}  # type: ignore[misc]


def _fmt(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def cell_text(cell: Cell | None, digits: int = 4) -> str:
    if cell is None:
        return "–"
    return f"{_fmt(cell.mean, digits)} ± {_fmt(cell.std, digits)} ({cell.n})"


@dataclass
class Table:
    rows: list[str]
    columns: list[tuple[str, float]]
    cells: dict[tuple[str, str, float], Cell]
    best: dict[tuple[str, float], str]

    def cell(self, row: str, column: tuple[str, float]) -> Cell | None:
        return self.cells.get((row, *column))


def build_table(cells: dict[tuple[str, str, float], Cell], higher_is_better: bool = True) -> Table:
    rows = sorted({key[0] for key in cells})
    columns = sorted({(key[1], key[2]) for key in cells})
    best = {}
    for column in columns:
        candidates = [(cells[(row, *column)].mean, row) for row in rows if (row, *column) in cells]
        best[column] = (max if higher_is_better else min)(candidates)[1]
    return Table(rows, columns, cells, best)


def column_name(column: tuple[str, float]) -> str:
    return f"{column[0]} r={column[1]:g}"


def common_text(common: dict[str, str] | None) -> str:
    return ", ".join(f"{k}={v}" for k, v in (common or {}).items()) or "none"


def table_markdown(table: Table, metric: str, common: dict[str, str] | None = None) -> str:
    header = ["method", *(column_name(c) for c in table.columns)]
    lines = [
        f"{metric}: mean ± sample std over seeds (number of seeds); best per column in bold",
        f"overrides common to all runs: {common_text(common)}",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---", *[":---:"] * len(table.columns)]) + "|",
    ]
    for row in table.rows:
        values = row_texts(table, row, best_mark="**", best_end="**")
        lines.append("| " + " | ".join([row.replace("|", "\\|"), *values]) + " |")
    return "\n".join(lines) + "\n"


def row_texts(table: Table, row: str, best_mark: str, best_end: str = "") -> list[str]:
    """The cell texts of one table row, the best of each column wrapped in ``best_mark``/``best_end``."""
    texts = []
    for column in table.columns:
        text = cell_text(table.cell(row, column))
        texts.append(f"{best_mark}{text}{best_end}" if table.best.get(column) == row else text)
    return texts


def table_csv(table: Table) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["method", *(column_name(c) for c in table.columns)])
    for row in table.rows:
        writer.writerow([row, *row_texts(table, row, best_mark="*")])
    return buffer.getvalue()


def cells_csv(table: Table) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["method", "dataset", "labeled_ratio", "mean", "std", "n", "best", "seeds", "protocol"])
    for row in table.rows:
        for column in table.columns:
            cell = table.cell(row, column)
            if cell is None:
                continue
            writer.writerow(
                [row, column[0], column[1], repr(cell.mean), "" if cell.std is None else repr(cell.std), cell.n,
                 table.best.get(column) == row, " ".join(str(r.seed) for r in cell.runs),
                 cell.runs[0].describe_protocol()]
            )  # fmt: skip
    return buffer.getvalue()


# ---- plots ------------------------------------------------------------------------------------------------
def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_ratio_curves(table: Table, metric: str, out: Path) -> list[Path]:
    """One PNG per dataset: the metric against the labeled ratio, one line per row, std error bars."""
    plt = _pyplot()
    written = []
    for dataset in sorted({c[0] for c in table.columns}):
        figure, axes = plt.subplots(figsize=(6, 4), dpi=120)
        for row in table.rows:
            points = [
                (r, table.cells[(row, d, r)]) for d, r in table.columns if d == dataset and (row, d, r) in table.cells
            ]
            if not points:
                continue
            ratios = [r for r, _ in points]
            means = [c.mean for _, c in points]
            stds = [c.std or 0.0 for _, c in points]
            axes.errorbar(ratios, means, yerr=stds, marker="o", capsize=3, label=row)
        title = f"{dataset}: {metric} against the labeled ratio"
        written.append(_finish_plot(figure, axes, "labeled ratio", metric, title, out / f"ratio_{_safe(dataset)}.png"))
    return written


def curve_groups(runs: Sequence[Run]) -> dict[tuple[str, float, tuple], dict[str, list[Run]]]:
    """``(dataset, ratio, protocol) -> row -> runs``: the runs whose curves share one plot."""
    groups: dict[tuple[str, float, tuple], dict[str, list[Run]]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        groups[(run.dataset, run.ratio, run.protocol)][run.row].append(run)
    return groups


def mean_curve(runs: Sequence[Run], key: str) -> list[tuple[int, float, float, int]]:
    """``(step, mean, std, n)`` over ``runs`` of ``key`` at every step some run logged (std 0 for one run)."""
    at_step: dict[int, list[float]] = defaultdict(list)
    for run in runs:
        for step, value in run.validation_curves().get(key, []):
            at_step[step].append(value)
    return [
        (step, statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0, len(values))
        for step, values in sorted(at_step.items())
    ]


def curve_keys(runs: Sequence[Run]) -> list[str]:
    """The monitored validation metric(s) and the ``diag/`` keys the runs logged, in that order."""
    logged = {key for run in runs for key in run.validation_curves()}
    monitors = {str((run.results.get("best_val") or {}).get("metric") or "val/mIoU") for run in runs}
    return sorted(monitors & logged) + sorted(k for k in logged if k.startswith("diag/") and "/" not in k[5:])


def learning_curves(runs: Sequence[Run], out: Path) -> list[Path]:
    """Plot each :func:`curve_keys` key against the step (mean ± std over seeds, one line per row) per dataset,
    ratio and protocol, and write every point to ``out/curves.csv``; return the plots."""
    plt = _pyplot()
    written, lines = [], [["row", "dataset", "labeled_ratio", "budget", "key", "step", "mean", "std", "n"]]
    keys = curve_keys(runs)
    for (dataset, ratio, protocol), rows in sorted(curve_groups(runs).items(), key=lambda item: item[0][:2]):
        budget = protocol[2]
        for key in keys:
            series = {row: mean_curve(members, key) for row, members in sorted(rows.items())}
            series = {row: points for row, points in series.items() if points}
            if not series:
                continue
            figure, axes = plt.subplots(figsize=(6, 4), dpi=120)
            for row, points in series.items():
                steps = [p[0] for p in points]
                means = [p[1] for p in points]
                stds = [p[2] for p in points]
                seeds = max(p[3] for p in points)
                (line,) = axes.plot(steps, means, label=f"{row} ({seeds} seed{'s' if seeds > 1 else ''})")
                axes.fill_between(steps, [m - d for m, d in zip(means, stds, strict=True)],
                                  [m + d for m, d in zip(means, stds, strict=True)], color=line.get_color(),
                                  alpha=0.15)  # fmt: skip
                lines += [[row, dataset, ratio, budget, key, *point] for point in points]
            name = f"curve_{_safe(key)}_{_safe(dataset)}_r{ratio:g}" + (f"_{budget}steps" if budget else "")
            title = f"{dataset}, r={ratio:g}: {key} (mean ± std over seeds)"
            written.append(_finish_plot(figure, axes, "step", key, title, out / f"{name}.png"))
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(lines)
    (out / "curves.csv").write_text(buffer.getvalue())
    return written


RUN_COLUMNS = ("method", "dataset", "labeled_ratio", "seed", "budget", "best_val_metric", "best_val",
               "best_val_step", "steps", "train_seconds", "source")  # fmt: skip


def runs_csv(runs: Sequence[Run], metrics: Sequence[str]) -> str:
    """One row per run: identity, ``metrics`` (test), best validation, steps, wall clock and where it came from."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([*RUN_COLUMNS[:5], *metrics, *RUN_COLUMNS[5:]])
    for run in sorted(runs, key=lambda r: (r.dataset, r.ratio, r.row, r.seed)):
        best = run.results.get("best_val") or {}
        writer.writerow(
            [run.row, run.dataset, run.ratio, run.seed, run.protocol[2],
             *("" if run.metric(m) is None else run.metric(m) for m in metrics),
             best.get("metric", ""), "" if best.get("value") is None else best["value"], best.get("step", ""),
             run.results.get("steps", ""), run.results.get("train_seconds", ""), run.path]
        )  # fmt: skip
    return buffer.getvalue()


def run_metrics(runs: Sequence[Run], metric: str) -> list[str]:
    """``metric`` first, then the test metrics every run has (both conventions: ``test/mIoU``, ``..._image``)."""
    common = set.intersection(*(set(run.results.get("metrics", {})) for run in runs)) if runs else set()
    ordered = [metric, *(k for k in ("test/mIoU", "test/mIoU_image", "test/mDice", "test/mDice_image") if k in common)]
    return list(dict.fromkeys(ordered))


def ablation_kind(key: str) -> str:
    lowered = key.lower()
    for kind, needles in ABLATION_KINDS:
        if any(needle in lowered for needle in needles):
            return kind
    return "settings"


def _sort_key(value: str) -> tuple[int, float | str]:
    try:
        return (0, float(value))
    except ValueError:
        return (1, value)


def ablations(runs: Sequence[Run], metric: str) -> dict[str, dict[tuple, dict[str, list[float]]]]:
    """``key -> (method, dataset, ratio, other variant keys) -> value of key -> metric values``, for every
    variant key that takes at least two values among otherwise identical runs."""
    found: dict[str, dict[tuple, dict[str, list[float]]]] = {}
    keys = sorted({k for run in runs for k, _ in run.variant})
    for key in keys:
        series: dict[tuple, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
        for run in runs:
            variant = dict(run.variant)
            value = run.metric(metric)
            if value is None or key not in variant:
                continue
            rest = tuple((k, v) for k, v in sorted(variant.items()) if k != key)
            series[(run.method, run.dataset, run.ratio, rest)][variant.pop(key)].append(value)
        varied = {group: dict(values) for group, values in series.items() if len(values) > 1}
        if varied:
            found[key] = varied
    return found


def plot_ablations(runs: Sequence[Run], metric: str, out: Path) -> list[Path]:
    plt = _pyplot()
    written = []
    for key, series in ablations(runs, metric).items():
        figure, axes = plt.subplots(figsize=(6, 4), dpi=120)
        values = sorted({v for points in series.values() for v in points}, key=_sort_key)
        numeric = all(_sort_key(v)[0] == 0 for v in values)
        positions = {v: (float(v) if numeric else i) for i, v in enumerate(values)}
        for (method, dataset, ratio, rest), points in sorted(series.items()):
            xs = sorted(points, key=_sort_key)
            label = f"{method}, {dataset}, r={ratio:g}" + (
                f" ({', '.join(f'{k}={v}' for k, v in rest)})" if rest else ""
            )
            axes.errorbar(
                [positions[x] for x in xs],
                [statistics.fmean(points[x]) for x in xs],
                yerr=[statistics.stdev(points[x]) if len(points[x]) > 1 else 0.0 for x in xs],
                marker="o", capsize=3, label=label,
            )  # fmt: skip
        if not numeric:
            axes.set_xticks(list(positions.values()), list(positions))
        title = f"ablation ({ablation_kind(key)}): {key}"
        written.append(_finish_plot(figure, axes, key, metric, title, out / f"ablation_{_safe(key)}.png"))
    return written


def _finish_plot(figure: Any, axes: Any, xlabel: str, ylabel: str, title: str, path: Path) -> Path:
    """Label, grid and legend ``axes``, save ``figure`` to ``path`` and close it; return ``path``."""
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path)
    _pyplot().close(figure)
    return path


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


# ---- HTML ---------------------------------------------------------------------------------------------------
def table_html(table: Table) -> str:
    head = "".join(f"<th>{html.escape(column_name(c))}</th>" for c in table.columns)
    body = []
    for row in table.rows:
        cells = []
        for column in table.columns:
            text = html.escape(cell_text(table.cell(row, column)))
            cells.append(f"<td><b>{text}</b></td>" if table.best.get(column) == row else f"<td>{text}</td>")
        body.append(f"<tr><th>{html.escape(row)}</th>{''.join(cells)}</tr>")
    return f"<table><tr><th>method</th>{head}</tr>{''.join(body)}</table>"


def page_html(
    table: Table,
    metric: str,
    plots: Sequence[Path],
    runs: Sequence[Run],
    sources: Sequence[Path],
    common: dict[str, str] | None = None,
    paired: str = "",
) -> str:
    images = "".join(
        f'<figure><img src="{html.escape(p.name)}" alt="{html.escape(p.stem)}"><figcaption>{html.escape(p.stem)}'
        "</figcaption></figure>"
        for p in plots
    )
    run_rows = "".join(
        f"<tr><td>{html.escape(r.row)}</td><td>{html.escape(r.dataset)}</td><td>{r.ratio:g}</td><td>{r.seed}</td>"
        f"<td>{_fmt(r.metric(metric))}</td><td>{r.results.get('train_seconds', '')}</td>"
        f"<td>{html.escape(r.describe_protocol())}</td>"
        f"<td>{html.escape(str(r.path))}</td></tr>"
        for r in sorted(runs, key=lambda r: (r.row, r.dataset, r.ratio, r.seed))
    )
    style = (
        "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin:1em 0}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:center}figure{display:inline-block;margin:1em}"
        "img{max-width:560px}"
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>semiseg report</title><style>{style}</style>"
        f"</head><body><h1>semiseg comparison</h1><p>{len(runs)} runs from "
        f"{html.escape(', '.join(map(str, sources)))}. Cells: mean ± sample std of {html.escape(metric)} over "
        f"seeds (number of seeds); best per column in bold. Overrides common to all runs: "
        f"{html.escape(common_text(common))}. Downloads: <a href='table.csv'>table.csv</a>, "
        f"<a href='cells.csv'>cells.csv</a>, <a href='table.md'>table.md</a>.</p>{table_html(table)}{paired}"
        f"<h2>Plots</h2>{images}<h2>Runs</h2><table><tr><th>method</th><th>dataset</th><th>ratio</th>"
        f"<th>seed</th><th>{html.escape(metric)}</th><th>train s</th><th>protocol</th><th>folder</th></tr>"
        f"{run_rows}</table>"
        "</body></html>\n"
    )


# ---- paired statistics against the supervised baseline -----------------------------------------------------------
PAIRED_COLUMNS = (
    "dataset", "labeled_ratio", "method", "baseline", "n_pairs", "mean_delta", "ci_low", "ci_high", "p_value",
    "boot_delta", "boot_ci_low", "boot_ci_high",
)  # fmt: skip
BASELINE = "supervised"
PER_IMAGE_METRIC = "mIoU_image"
CONFIDENCE = 0.95
BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0


@dataclass
class SeedPairs:
    """The seed-paired differences ``method - baseline`` of one metric and their statistics."""

    deltas: list[float]
    mean: float
    ci_low: float | None
    ci_high: float | None
    p_value: float
    p_floor: float

    @property
    def n(self) -> int:
        return len(self.deltas)

    @property
    def interval_excludes_zero(self) -> bool:
        return self.ci_low is not None and self.ci_high is not None and (self.ci_low > 0 or self.ci_high < 0)


def t_interval(deltas: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float | None, float | None]:
    """The ``confidence`` interval of the mean of ``deltas`` from Student's t with ``n - 1`` degrees of freedom
    (``None, None`` for fewer than two values)."""
    from scipy import stats

    if len(deltas) < 2:
        return None, None
    mean = statistics.fmean(deltas)
    half = stats.t.ppf(0.5 + confidence / 2, df=len(deltas) - 1) * statistics.stdev(deltas) / math.sqrt(len(deltas))
    return float(mean - half), float(mean + half)


def sign_flip_p_value(deltas: Sequence[float]) -> float:
    """Exact two-sided p-value of the paired sign-flip permutation test of ``mean(deltas) = 0``: the share of the
    ``2^n`` sign assignments whose mean is at least as far from 0 as the observed one. It cannot fall below
    :func:`sign_flip_floor` ``= 2 / 2^n`` (the observed signs and their mirror image)."""
    from scipy import stats

    if not deltas:
        return float("nan")
    if len(deltas) < 2 or all(d == 0 for d in deltas):
        return 1.0  # one pair: d and -d are equally extreme
    result = stats.permutation_test(
        (list(deltas),), statistic=lambda x, axis=-1: x.mean(axis=axis), permutation_type="samples",
        n_resamples=math.inf, alternative="two-sided",
    )  # fmt: skip
    return float(result.pvalue)


def sign_flip_floor(n: int) -> float:
    """The smallest p-value an exact sign-flip test over ``n`` pairs can give: ``2 / 2^n`` (0.0625 for 5)."""
    return min(1.0, 2.0 / 2**n)


def seed_pairs(deltas: Sequence[float], confidence: float = CONFIDENCE) -> SeedPairs:
    low, high = t_interval(deltas, confidence)
    return SeedPairs(list(deltas), statistics.fmean(deltas), low, high, sign_flip_p_value(deltas),
                     sign_flip_floor(len(deltas)))  # fmt: skip


def read_per_image(run_dir: Path, column: str = PER_IMAGE_METRIC) -> dict[str, float]:
    """``id -> column`` from a run's ``per_image.csv`` (images where it is empty, i.e. undefined, left out)."""
    path = run_dir / PER_IMAGE_FILE
    with path.open(newline="") as handle:
        return {row["id"]: float(row[column]) for row in csv.DictReader(handle) if row.get(column)}


def paired_bootstrap(
    pairs: Sequence[tuple[dict[str, float], dict[str, float]]],
    confidence: float = CONFIDENCE,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
) -> tuple[float, float, float] | None:
    """Paired bootstrap over test images, pooled over seed pairs.

    Each pair is ``(method, baseline)`` per-image scores ``id -> value`` of one seed. The difference of each
    image common to every pair is averaged over the pairs (``D_i``); the images are resampled with replacement
    (``resamples`` times, percentile interval). Returns ``(mean D, low, high)``, or ``None`` without a common image.
    """
    import numpy as np
    from scipy import stats

    if not pairs:
        return None
    common = sorted(set.intersection(*(set(m) & set(b) for m, b in pairs)))
    if not common:
        return None
    per_image = np.array([[m[i] - b[i] for i in common] for m, b in pairs]).mean(axis=0)
    mean = float(per_image.mean())
    if len(common) < 2 or np.ptp(per_image) == 0:
        return mean, mean, mean
    result = stats.bootstrap(
        (per_image,), np.mean, confidence_level=confidence, n_resamples=resamples, method="percentile",
        rng=np.random.default_rng(seed),
    )  # fmt: skip
    return mean, float(result.confidence_interval.low), float(result.confidence_interval.high)


@dataclass
class PairedComparison:
    """One method against the baseline on one dataset and labeled ratio, under one protocol."""

    dataset: str
    labeled_ratio: float
    method: str
    baseline: str
    seeds: list[int]
    seed: SeedPairs
    bootstrap: tuple[float, float, float] | None

    def csv_row(self) -> list[Any]:
        boot = self.bootstrap or (None, None, None)
        values = [self.seed.mean, self.seed.ci_low, self.seed.ci_high, self.seed.p_value, *boot]
        return [self.dataset, self.labeled_ratio, self.method, self.baseline, self.seed.n,
                *("" if v is None else repr(float(v)) for v in values)]  # fmt: skip


def paired_comparisons(runs: Sequence[Run], metric: str, baseline: str = BASELINE) -> list[PairedComparison]:
    """Every row against ``baseline`` run on the same dataset, labeled ratio and protocol (split and budget),
    paired by seed; rows with no common seed are left out (logged)."""
    by_cell: dict[tuple[str, str, float, tuple], dict[int, Run]] = defaultdict(dict)
    for run in runs:
        if run.metric(metric) is not None:
            by_cell[(run.row, run.dataset, run.ratio, run.protocol)][run.seed] = run
    found = []
    for (row, dataset, ratio, protocol), members in sorted(by_cell.items(), key=lambda item: item[0][:3]):
        reference = by_cell.get((baseline, dataset, ratio, protocol))
        if row == baseline or reference is None:
            if row != baseline:
                log.warning("paired: no %s runs with the protocol of %s (%s, r=%g)", baseline, row, dataset, ratio)
            continue
        seeds = sorted(set(members) & set(reference))
        if not seeds:
            log.warning("paired: %s and %s share no seed on %s r=%g", row, baseline, dataset, ratio)
            continue
        deltas = [members[s].metric(metric) - reference[s].metric(metric) for s in seeds]  # type: ignore[operator]
        image_pairs = []
        for s in seeds:
            scores, reference_scores = members[s].per_image_scores(), reference[s].per_image_scores()
            if scores is not None and reference_scores is not None:
                image_pairs.append((scores, reference_scores))
        bootstrap = paired_bootstrap(image_pairs) if len(image_pairs) == len(seeds) else None
        found.append(PairedComparison(dataset, ratio, row, baseline, seeds, seed_pairs(deltas), bootstrap))
    return found


def paired_csv(comparisons: Sequence[PairedComparison]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(PAIRED_COLUMNS)
    writer.writerows(c.csv_row() for c in comparisons)
    return buffer.getvalue()


def _paired_cells(comparison: PairedComparison, digits: int = 4) -> list[str]:
    seed, boot = comparison.seed, comparison.bootstrap
    delta = f"{seed.mean:+.{digits}f}"
    if seed.interval_excludes_zero:
        delta = f"**{delta}**"
    interval = "n/a" if seed.ci_low is None else f"[{seed.ci_low:+.{digits}f}, {seed.ci_high:+.{digits}f}]"
    boot_text = "n/a" if boot is None else f"{boot[0]:+.{digits}f} [{boot[1]:+.{digits}f}, {boot[2]:+.{digits}f}]"
    return [comparison.dataset, f"{comparison.labeled_ratio:g}", comparison.method, str(seed.n), delta, interval,
            f"{seed.p_value:.4f} (floor {seed.p_floor:.4f})", boot_text]  # fmt: skip


PAIRED_HEADER = ["dataset", "ratio", "method", "pairs", "Δ mean", "95 % t interval", "p (sign-flip)",
                 f"Δ {PER_IMAGE_METRIC} bootstrap [95 %]"]  # fmt: skip


def paired_note(metric: str, baseline: str = BASELINE) -> str:
    return (
        f"Δ = method − {baseline} of {metric}, paired by seed (same dataset, ratio, split and budget). Bold: the 95 % "
        "t interval of the seed-paired mean excludes 0 (only those). p: exact two-sided sign-flip permutation "
        "test over the pairs; with n pairs it cannot fall below its floor 2/2^n. Bootstrap: per-image "
        f"{PER_IMAGE_METRIC} differences from per_image.csv, averaged over the paired seeds, images resampled "
        f"({BOOTSTRAP_RESAMPLES} resamples, percentile interval)."
    )


def paired_markdown(comparisons: Sequence[PairedComparison], metric: str, baseline: str = BASELINE) -> str:
    if not comparisons:
        return f"\n## Paired differences against {baseline}\n\nno method shares seeds and protocol with {baseline}\n"
    lines = [f"\n## Paired differences against {baseline}", "", "| " + " | ".join(PAIRED_HEADER) + " |",
             "|" + "|".join(["---"] * 3 + [":---:"] * (len(PAIRED_HEADER) - 3)) + "|"]  # fmt: skip
    lines += ["| " + " | ".join(_paired_cells(c)) + " |" for c in comparisons]
    return "\n".join([*lines, "", paired_note(metric, baseline)]) + "\n"


def paired_html(comparisons: Sequence[PairedComparison], metric: str, baseline: str = BASELINE) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in PAIRED_HEADER)
    body = []
    for comparison in comparisons:
        cells = [html.escape(text.replace("**", "")) for text in _paired_cells(comparison)]
        if comparison.seed.interval_excludes_zero:
            cells[4] = f"<b>{cells[4]}</b>"
        body.append("<tr>" + "".join(f"<td>{cell}</td>" for cell in cells) + "</tr>")
    return (
        f"<h2>Paired differences against {html.escape(baseline)}</h2><table><tr>{head}</tr>{''.join(body)}</table>"
        f"<p>{html.escape(paired_note(metric, baseline))} Download: <a href='paired.csv'>paired.csv</a>.</p>"
    )


def write_paired(runs: Sequence[Run], metric: str, out: Path) -> tuple[list[PairedComparison], str, str]:
    """Write ``out/paired.csv``; return the comparisons and their Markdown and HTML sections."""
    comparisons = paired_comparisons(runs, metric)
    (out / "paired.csv").write_text(paired_csv(comparisons))
    return comparisons, paired_markdown(comparisons, metric), paired_html(comparisons, metric)


# ---- entry point -----------------------------------------------------------------------------------------------
def make_report(folders: Sequence[Path], out: Path | None = None, metric: str = "test/mIoU") -> dict[str, Any]:
    """Write the report of the runs under ``folders`` into ``out`` (default ``folders[0]/report``)."""
    folders = [Path(f) for f in folders]
    out = Path(out) if out else (folders[0] if folders[0].is_dir() else folders[0].parent) / "report"
    runs = [run for run in find_runs(folders) if out not in run.path.parents]
    common = mark_varying_keys(runs)
    cells = build_cells(runs, metric)
    if not cells:
        raise ReportError(f"no run under {', '.join(map(str, folders))} has the metric {metric}")
    table = build_table(cells, higher_is_better="loss" not in metric)
    out.mkdir(parents=True, exist_ok=True)
    comparisons, paired_md, paired_page = write_paired(runs, metric, out)
    (out / "table.md").write_text(table_markdown(table, metric, common) + paired_md)
    (out / "table.csv").write_text(table_csv(table))
    (out / "cells.csv").write_text(cells_csv(table))
    (out / "runs.csv").write_text(runs_csv(runs, run_metrics(runs, metric)))
    plots = plot_ratio_curves(table, metric, out) + plot_ablations(runs, metric, out) + learning_curves(runs, out)
    (out / "index.html").write_text(page_html(table, metric, plots, runs, folders, common, paired_page))
    return {"out": out, "table": table, "plots": plots, "runs": runs, "common": common, "paired": comparisons}


def log_comparison(table: Table, plots: Sequence[Path], project: str, group: str | None, metric: str) -> str:
    """Log the comparison ``table`` and ``plots`` to a new W&B run of ``job_type=report``; return the run's folder."""
    import wandb

    columns = ["method", *(column_name(c) for c in table.columns)]
    rows = [[row, *(cell_text(table.cell(row, c)) for c in table.columns)] for row in table.rows]
    long_rows = [
        [row, dataset, ratio, cell.mean, cell.std, cell.n]
        for (row, dataset, ratio), cell in sorted(table.cells.items())
    ]
    run = wandb.init(project=project, group=group, job_type="report", name=f"report-{group or 'all'}")
    run.log(
        {
            "comparison": wandb.Table(columns=columns, data=rows),
            "comparison_cells": wandb.Table(
                columns=["method", "dataset", "labeled_ratio", "mean", "std", "n"], data=long_rows
            ),
            **{f"plots/{path.stem}": wandb.Image(str(path)) for path in plots},
        }
    )
    run.summary["metric"] = metric
    folder = run.dir
    run.finish()
    return folder


@exit_on_user_error
def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m semiseg.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", type=Path, help="folders of runs or multiruns (searched recursively)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: FIRST_FOLDER/report)")
    parser.add_argument("--metric", default="test/mIoU", help="results.json metric to compare (default test/mIoU)")
    parser.add_argument(
        "--save-records",
        type=Path,
        default=None,
        metavar="FILE.jsonl",
        help="also write every run read as one JSON line (read back when given as a folder)",
    )
    parser.add_argument("--wandb", metavar="PROJECT", default=None, help="also log the table and plots to W&B")
    parser.add_argument("--wandb-group", default=None, help="W&B group of the report run (e.g. the sweep_name)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.save_records is not None and args.save_records.suffix != RECORDS_SUFFIX:
        raise ReportError(f"--save-records {args.save_records}: give a file name ending in {RECORDS_SUFFIX}")
    report = make_report(args.folders, args.out, args.metric)
    if args.save_records is not None:
        save_records(report["runs"], args.save_records)
        print(f"{len(report['runs'])} run records -> {args.save_records}")
    print(table_markdown(report["table"], args.metric, report["common"]))
    print(paired_markdown(report["paired"], args.metric))
    print(f"{len(report['runs'])} runs -> {report['out']}/index.html ({len(report['plots'])} plots)")
    if args.wandb:
        folder = log_comparison(report["table"], report["plots"], args.wandb, args.wandb_group, args.metric)
        print(f"W&B report run: {folder}")


if __name__ == "__main__":
    main(sys.argv[1:])
