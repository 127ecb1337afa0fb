"""``experiment=active_learning``: which images to label next, simulated on data whose masks are hidden.

The run starts from the protocol's split at ``labeled_ratio`` (stratified, the same for every method): its
labeled part keeps its masks, the unlabeled part's masks stay hidden. Round 0 trains the method on it (the one
fit of the suite, :func:`semiseg.runner.fit_and_test`, which also tests on the fixed test split). Then, for each
strategy of ``active_learning.strategies``:

* ``suggest``: the last round's model ranks the unlabeled images (:mod:`semiseg.suggest` with
  ``active_learning.suggest``) and the top ``k`` are picked;
* ``random``: ``k`` unlabeled images drawn at random (seeded by ``seed``, the strategy and the round);

their masks are revealed (they move to the labeled part) and the method is trained again from scratch, for
``active_learning.rounds`` trainings in all. Validation and test parts never change.

Written into the run dir: ``<strategy>/round_<r>/`` (each a complete run with ``results.json``; round 0 is shared
as ``round_0/``), ``active_learning.json`` and ``active_learning.csv`` (per strategy and round: labeled images,
test mIoU, the picked ids) and ``active_learning.png`` (test mIoU against the number of labeled images, one line
per strategy). A finished round is reused when the command is run again with the same ``hydra.run.dir``.
With ``trainer.fast_dev_run`` the loop stops after one reveal per strategy (a check of the pipeline).

Over seeds: ``python -m semiseg.active_learning DIR [DIR ...] --out OUT`` reads every ``active_learning.json``
under the folders and writes ``OUT/curve.csv`` (per method, dataset, strategy and round: labeled images, mean and
sample std of test mIoU, seeds, and the seed-paired difference to ``random``) and ``OUT/curve.png`` (mean ± std
against labeled images, one line per strategy).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import io
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf, open_dict

from semiseg import predict
from semiseg.data.split import Split
from semiseg.errors import ConfigError
from semiseg.io import atomic_write_bytes, atomic_write_json, atomic_write_text
from semiseg.runner import apply_performance, build_datamodule, build_module, fit_and_test
from semiseg.suggest import SuggestSettings, load_images, score_images, select

log = logging.getLogger("semiseg.active_learning")

STRATEGIES = ("suggest", "random")
ROUND_FILE = "round.json"
WEIGHTS_FILE = "weights.pt"
SPLIT_IN_FILE = "revealed_split.json"
REPORT_JSON = "active_learning.json"
REPORT_CSV = "active_learning.csv"
REPORT_PNG = "active_learning.png"


@dataclass(frozen=True)
class ActiveLearningSettings:
    """``active_learning.*``: trainings per strategy, images revealed per round, strategies, suggest settings."""

    rounds: int = 3
    k: int = 5
    strategies: Sequence[str] = STRATEGIES
    suggest: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | None) -> ActiveLearningSettings:
        settings = cls(**dict(config or {}))
        for key in ("rounds", "k"):
            value = getattr(settings, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"active_learning.{key}={value!r} must be a positive integer")
        unknown = sorted(set(settings.strategies) - set(STRATEGIES))
        if unknown or not settings.strategies:
            raise ConfigError(f"active_learning.strategies={list(settings.strategies)}: choose from {list(STRATEGIES)}")
        SuggestSettings.from_config(settings.suggest)  # checked before anything trains
        return settings


def round_config(cfg: DictConfig, run_dir: Path, split_file: Path) -> DictConfig:
    """The config of one training: the run's, in ``run_dir``, on ``split_file``, without the simulation keys."""
    round_cfg = copy.deepcopy(cfg)
    with open_dict(round_cfg):
        round_cfg.paths.output_dir = str(run_dir)
        round_cfg.split_file = str(split_file)
        round_cfg.pop("active_learning", None)
        round_cfg.pop("driver", None)
    return round_cfg


def strategy_rng(seed: int, strategy: str, round_index: int) -> np.random.Generator:
    digest = hashlib.sha256(f"{seed}:{strategy}:{round_index}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def reveal(split: Split, picked: Sequence[str]) -> Split:
    """``split`` with ``picked`` moved from the unlabeled to the labeled part."""
    chosen = set(picked)
    return Split(
        labeled=[*split.labeled, *picked],
        unlabeled=[i for i in split.unlabeled if i not in chosen],
        val=list(split.val),
        test=list(split.test),
        meta={**split.meta, "revealed": [*split.meta.get("revealed", []), *picked]},
    )


class ActiveLearningRun:
    """The simulation of ``cfg`` in ``cfg.paths.output_dir``."""

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg
        settings = ActiveLearningSettings.from_config(
            OmegaConf.to_container(cfg.active_learning, resolve=True) if cfg.get("active_learning") else None
        )
        if cfg.trainer.get("fast_dev_run"):  # check the whole loop cheaply: one reveal per strategy
            settings = dataclasses.replace(settings, rounds=min(settings.rounds, 2))
        self.settings = settings
        self.suggest_settings = SuggestSettings.from_config(self.settings.suggest)
        self.output_dir = Path(cfg.paths.output_dir)
        self.datamodule = build_datamodule(cfg, get_class(cfg.method._target_))
        self.samples = {sample.id: sample for part in self.datamodule.parts.values() for sample in part}

    @staticmethod
    def finished(folder: Path) -> dict[str, Any] | None:
        """The record of a round trained earlier in ``folder``, if any."""
        record_path = folder / ROUND_FILE
        if not record_path.is_file():
            return None
        log.info("active learning: %s done earlier, reusing it", folder)
        return json.loads(record_path.read_text())

    def train_round(self, folder: Path, split: Split, picked: Sequence[str]) -> dict[str, Any]:
        """Train on ``split`` in ``folder``; the round's record (also ``round.json``)."""
        folder.mkdir(parents=True, exist_ok=True)
        split.save(folder / SPLIT_IN_FILE)
        results = fit_and_test(
            round_config(self.cfg, folder, folder / SPLIT_IN_FILE), folder, results_file="results.json",
            weights_file=WEIGHTS_FILE,
        )  # fmt: skip
        record = {
            "labeled": len(split.labeled),
            "unlabeled": len(split.unlabeled),
            "test/mIoU": results["metrics"].get("test/mIoU"),
            "test/mDice": results["metrics"].get("test/mDice"),
            "best_val": results["best_val"]["value"],
            "steps": results["steps"],
            "train_seconds": results["train_seconds"],
            "picked": list(picked),
            "labeled_ids": list(split.labeled),
            "unlabeled_ids": list(split.unlabeled),
        }
        atomic_write_json(folder / ROUND_FILE, record)
        return record

    def load_model(self, folder: Path) -> Any:
        """The tested weights of the round in ``folder``, in eval mode."""
        module = apply_performance(build_module(round_config(self.cfg, folder, folder / SPLIT_IN_FILE)),
                                   self.cfg.get("performance"))  # fmt: skip
        module.load_state_dict(torch.load(folder / WEIGHTS_FILE, map_location="cpu", weights_only=True))
        return module.eval()

    def pick(self, strategy: str, folder: Path, unlabeled: Sequence[str], round_index: int) -> list[str]:
        """``k`` unlabeled ids by ``strategy``, after the round trained in ``folder``."""
        k = min(self.settings.k, len(unlabeled))
        if strategy == "random":
            rng = strategy_rng(int(self.cfg.seed), strategy, round_index)
            return [str(i) for i in rng.choice(sorted(unlabeled), size=k, replace=False)]
        module = self.load_model(folder)
        card = predict.model_card(module, self.cfg.dataset, self.cfg, folder / WEIGHTS_FILE)
        images = load_images(self.datamodule.dataset, [self.samples[i] for i in unlabeled])
        ranked = select(score_images(module, card, images, self.suggest_settings), k, self.suggest_settings)
        return [item.id for item in ranked[:k]]

    def run(self) -> dict[str, Any]:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.output_dir / "config.yaml", OmegaConf.to_yaml(self.cfg, resolve=True))
        start = self.datamodule.split
        first_folder = self.output_dir / "round_0"
        first = self.finished(first_folder) or self.train_round(first_folder, start, [])
        curves: dict[str, list[dict[str, Any]]] = {}
        for strategy in self.settings.strategies:
            split, previous, points = start, first_folder, [{"round": 0, **first}]
            for round_index in range(1, self.settings.rounds):
                if not split.unlabeled:
                    log.info("active learning: no unlabeled image left after round %d", round_index - 1)
                    break
                folder = self.output_dir / strategy / f"round_{round_index}"
                done = self.finished(folder)
                picked = done["picked"] if done else self.pick(strategy, previous, split.unlabeled, round_index)
                split = reveal(split, picked)
                points.append({"round": round_index, **(done or self.train_round(folder, split, picked))})
                previous = folder
                log.info("active learning %s round %d: %d labeled, test mIoU %s", strategy, round_index,
                         len(split.labeled), points[-1]["test/mIoU"])  # fmt: skip
            curves[strategy] = points
        return self.report(curves)

    @staticmethod
    def total_steps(curves: Mapping[str, list[dict[str, Any]]]) -> int:
        """Optimisation steps of all trainings (the shared round 0 counted once)."""
        first = next(iter(curves.values()))[0]["steps"]
        return int(first + sum(point["steps"] for points in curves.values() for point in points[1:]))

    def report(self, curves: Mapping[str, list[dict[str, Any]]]) -> dict[str, Any]:
        """Write the curves (json, csv, png); return the summary."""
        slim = {
            strategy: [{k: v for k, v in point.items() if not k.endswith("_ids")} for point in points]
            for strategy, points in curves.items()
        }
        summary = {
            "experiment": "active_learning",
            "method": self.cfg.method.name,
            "dataset": self.cfg.dataset.name,
            "seed": int(self.cfg.seed),
            "k": self.settings.k,
            "rounds": self.settings.rounds,
            "suggest": dict(self.suggest_settings.__dict__),
            "curves": slim,
            "steps": self.total_steps(curves),
            "metrics": {},
        }
        atomic_write_json(self.output_dir / REPORT_JSON, summary)
        rows = [
            {"strategy": strategy, "round": p["round"], "labeled": p["labeled"], "test_mIoU": p["test/mIoU"],
             "test_mDice": p["test/mDice"], "picked": " ".join(p["picked"])}
            for strategy, points in slim.items() for p in points
        ]  # fmt: skip
        predict.write_csv(self.output_dir / REPORT_CSV, rows)
        plot_curves(slim, self.output_dir / REPORT_PNG, f"{self.cfg.method.name} on {self.cfg.dataset.name}")
        return summary


def plot_curves(curves: Mapping[str, Sequence[Mapping[str, Any]]], path: Path, title: str) -> None:
    """Test mIoU against the number of labeled images, one line per strategy (a band of ± ``test/mIoU_std``
    where the points carry it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(5, 3.5))
    for strategy, points in curves.items():
        xs = [p["labeled"] for p in points]
        ys = [np.nan if p["test/mIoU"] is None else p["test/mIoU"] for p in points]
        line = axis.plot(xs, ys, marker="o", label=strategy)[0]
        if all(p.get("test/mIoU_std") is not None for p in points):
            spread = np.asarray([p["test/mIoU_std"] for p in points], dtype=float)
            axis.fill_between(xs, np.asarray(ys) - spread, np.asarray(ys) + spread, color=line.get_color(), alpha=0.2)
    axis.set_xlabel("labeled images")
    axis.set_ylabel("test mIoU")
    axis.set_title(title)
    axis.legend()
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120)
    plt.close(figure)
    atomic_write_bytes(path, buffer.getvalue())


def run_active_learning(cfg: DictConfig) -> dict[str, Any]:
    """Entry point used by ``semiseg.train`` (``driver: semiseg.active_learning.run_active_learning``)."""
    if cfg.method.get("driver"):
        raise ConfigError(
            f"method={cfg.method.name} runs its own generation loop; active learning needs a per-step method"
        )
    return ActiveLearningRun(cfg).run()


def load_summaries(folders: Sequence[Path]) -> list[dict[str, Any]]:
    """Every ``active_learning.json`` under ``folders`` (a folder may be a run dir or hold many)."""
    paths = sorted({p for folder in folders for p in Path(folder).rglob(REPORT_JSON)})
    if not paths:
        raise ConfigError(f"no {REPORT_JSON} under {[str(f) for f in folders]}; give the run (or sweep) folders")
    return [json.loads(path.read_text()) for path in paths]


def summarize(summaries: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Rows per (method, dataset, k, strategy, round): labeled images, mean and sample std of test mIoU over the
    seeds, the seeds, and the mean seed-paired difference to the ``random`` strategy at the same round."""
    groups: dict[tuple, dict[int, float]] = {}
    labeled: dict[tuple, list[int]] = {}
    for summary in summaries:
        for strategy, points in summary["curves"].items():
            for point in points:
                key = (summary["method"], summary["dataset"], summary["k"], strategy, point["round"])
                if point.get("test/mIoU") is not None:
                    groups.setdefault(key, {})[int(summary["seed"])] = float(point["test/mIoU"])
                    labeled.setdefault(key, []).append(int(point["labeled"]))
    rows = []
    for key in sorted(groups):
        method, dataset, k, strategy, round_index = key
        values = groups[key]
        scores = np.asarray(list(values.values()))
        baseline = groups.get((method, dataset, k, "random", round_index), {})
        paired = [values[seed] - baseline[seed] for seed in values if seed in baseline]
        rows.append({
            "method": method, "dataset": dataset, "k": k, "strategy": strategy, "round": round_index,
            "labeled": int(np.mean(labeled[key])), "test_mIoU_mean": round(float(scores.mean()), 4),
            "test_mIoU_std": round(float(scores.std(ddof=1)), 4) if len(scores) > 1 else None,
            "seeds": " ".join(str(seed) for seed in sorted(values)),
            "delta_vs_random": round(float(np.mean(paired)), 4) if paired and strategy != "random" else None,
            "delta_vs_random_per_seed": " ".join(f"{d:+.4f}" for d in paired) if strategy != "random" else "",
        })  # fmt: skip
    return rows


def write_summary(folders: Sequence[Path], out: Path) -> list[dict[str, Any]]:
    """``curve.csv`` and one ``curve_<method>_<dataset>.png`` per method and dataset in ``out``."""
    rows = summarize(load_summaries(folders))
    out.mkdir(parents=True, exist_ok=True)
    predict.write_csv(out / "curve.csv", rows)
    for method, dataset in sorted({(r["method"], r["dataset"]) for r in rows}):
        curves: dict[str, list[dict[str, Any]]] = {}
        for row in (r for r in rows if (r["method"], r["dataset"]) == (method, dataset)):
            curves.setdefault(row["strategy"], []).append(
                {"labeled": row["labeled"], "test/mIoU": row["test_mIoU_mean"], "test/mIoU_std": row["test_mIoU_std"]}
            )
        seeds = max(len(r["seeds"].split()) for r in rows if (r["method"], r["dataset"]) == (method, dataset))
        plot_curves(
            curves, out / f"curve_{method}_{dataset}.png", f"{method} on {dataset}, mean ± std of {seeds} seeds"
        )
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="Active-learning curves over seeds (mean ± std, paired vs random)")
    parser.add_argument("folders", nargs="+", type=Path, help="run or sweep folders holding active_learning.json")
    parser.add_argument("--out", type=Path, required=True, help="folder for curve.csv and the plots")
    args = parser.parse_args(argv)
    try:
        rows = write_summary(args.folders, args.out)
    except ConfigError as error:
        print(f"error: {error}", flush=True)
        return 2
    for row in rows:
        print(
            f"{row['method']} {row['dataset']} {row['strategy']:8s} round {row['round']} labeled {row['labeled']:4d} "
            f"test mIoU {row['test_mIoU_mean']:.4f} ± {row['test_mIoU_std']} (seeds {row['seeds']})"
            + (f"  Δ vs random {row['delta_vs_random']:+.4f}" if row["delta_vs_random"] is not None else "")
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
