"""Weights & Biases: what a run leaves in W&B beyond Lightning's ``WandbLogger``.

``logger=wandb`` names each run ``<method>-<dataset>-r<ratio>-s<seed>``, groups runs by sweep
(``sweep_name``; single runs go to ``single-runs``), tags them with the method, dataset and experiment, and
logs the resolved config (``train.py`` calls ``log_hyperparams``). At the end of a run
:func:`finish_run` puts the final test metrics and the run's identity into the summary, adds a one-row
``results`` table (W&B concatenates these across runs in a table panel), and closes the run, so the next
job of a multirun in the same process starts its own. ``WANDB_MODE=offline`` works without an account;
``wandb sync <run dir>/wandb/offline-run-*`` uploads later.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from lightning.pytorch.loggers import Logger, WandbLogger

IDENTITY = ("method", "dataset", "model", "labeled_ratio", "seed", "split_seed")


def results_row(results: dict[str, Any], metrics: Sequence[str]) -> list[Any]:
    return [results.get(key) for key in IDENTITY] + [results.get("metrics", {}).get(name) for name in metrics]


def finish_run(loggers: Iterable[Logger], results: dict[str, Any]) -> None:
    """Summary, ``results`` table and ``finish()`` for every W&B logger of the run."""
    for logger in loggers:
        if not isinstance(logger, WandbLogger):
            continue
        import wandb

        run = logger.experiment
        metrics = sorted(results.get("metrics", {}))
        run.summary.update({key: value for key, value in results.get("metrics", {}).items() if value is not None})
        run.summary.update({key: results.get(key) for key in (*IDENTITY, "steps", "num_params", "train_seconds")})
        run.summary["best_val"] = results.get("best_val")
        table = wandb.Table(columns=[*IDENTITY, *metrics], data=[results_row(results, metrics)])
        run.log({"results": table})
        run.finish()
