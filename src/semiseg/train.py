"""The training entry point: ``python -m semiseg.train [overrides]``.

Checks the config, decides what ``resume`` means for the run directory, and hands the run to
:func:`semiseg.runner.fit_and_test` (seed -> dataset -> DataModule (``split.json``) -> method module ->
callbacks, loggers, trainer -> fit -> test with the best checkpoint -> ``results.json``), or to the method's
driver (the self-training family trains in generations of such fits). Everything comes from the Hydra config
in ``conf/`` (``conf/train.yaml`` lists the groups). Nothing in the package imports this module.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.utils import get_method
from omegaconf import DictConfig

from semiseg import sweeps
from semiseg.config import CONFIG_DIR
from semiseg.errors import ConfigError, exit_on_user_error, run_hydra_app
from semiseg.results import RESULTS_FILE
from semiseg.resume import complete_results, last_checkpoint
from semiseg.runner import fit_and_test

sweeps.register_resolvers()

log = logging.getLogger("semiseg.train")


def check_config(cfg: DictConfig) -> None:
    """Reject the command-line values users mistype most, before anything is built."""
    ratio = cfg.get("labeled_ratio")
    if isinstance(ratio, bool) or not isinstance(ratio, int | float) or not 0 < ratio <= 1:
        raise ConfigError(f"labeled_ratio={ratio!r} must be a number in (0, 1], e.g. labeled_ratio=0.1")
    trainer = cfg.get("trainer") or {}
    if trainer.get("sync_batchnorm") and (
        trainer.get("accelerator") == "cpu" or (trainer.get("accelerator") == "auto" and not torch.cuda.is_available())
    ):
        raise ConfigError(
            "trainer.sync_batchnorm=true needs GPUs (torch's SyncBatchNorm is CUDA-only); "
            "use trainer.sync_batchnorm=false on the CPU"
        )
    for key in ("seed", "split_seed"):
        value = cfg.get(key)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}={value!r} must be an integer, e.g. {key}=0")
    learning_rate = (cfg.get("optimizer") or {}).get("lr")
    if learning_rate is not None and (
        isinstance(learning_rate, bool) or not isinstance(learning_rate, int | float) or not learning_rate > 0
    ):
        raise ConfigError(f"optimizer.lr={learning_rate!r} must be a positive number, e.g. optimizer.lr=1e-3")
    max_steps = cfg.trainer.get("max_steps", -1)
    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or not (max_steps == -1 or max_steps > 0):
        raise ConfigError(
            f"trainer.max_steps={max_steps!r} must be a positive integer (or -1 to use trainer.max_epochs)"
        )
    ckpt_path = cfg.get("ckpt_path")
    if ckpt_path and ckpt_path not in ("last", "best") and not Path(ckpt_path).is_file():
        raise ConfigError(f"ckpt_path={ckpt_path}: no such checkpoint file; give the path of a saved .ckpt")


def resume_point(cfg: DictConfig, output_dir: Path) -> tuple[str, str | None, dict | None]:
    """What to do with ``resume``: ``("skip", None, results)`` when ``results.json`` is complete,
    ``("resume", last.ckpt, None)`` when a last checkpoint exists, else ``("train", ckpt_path, None)``."""
    if cfg.get("resume", False):
        results = complete_results(output_dir / RESULTS_FILE, cfg)
        if results is not None:
            return "skipped", None, results
        checkpoint = last_checkpoint(output_dir)
        if checkpoint is not None:
            return "resumed", str(checkpoint), None
    return "trained", cfg.get("ckpt_path"), None


@exit_on_user_error
def train(cfg: DictConfig) -> dict[str, Any]:
    """Run one experiment described by ``cfg``; return the content of ``results.json``."""
    check_config(cfg)
    if cfg.method.get("driver"):  # methods that train in generations (self-training) run a driver of fits
        return get_method(cfg.method.driver)(cfg)
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    action, ckpt_path, finished = resume_point(cfg, output_dir)
    sweeps.LAST_ACTION["action"] = action
    if finished is not None:
        log.info("resume: %s is complete, skipping this run", output_dir / RESULTS_FILE)
        return finished
    if action == "resumed":
        log.info("resume: continuing from %s", ckpt_path)
    elif (output_dir / RESULTS_FILE).exists() or last_checkpoint(output_dir) is not None:
        raise ConfigError(
            f"hydra.run.dir={output_dir} already holds another run (results.json or checkpoints/last.ckpt); "
            "choose a new directory, or add resume=true to continue that run"
        )
    results = fit_and_test(
        cfg, output_dir, ckpt_path=ckpt_path, resuming=action == "resumed", results_file=RESULTS_FILE
    )
    metrics = results["metrics"]
    log.info(
        "test mIoU %s  mDice %s  -> %s",
        metrics.get("test/mIoU"),
        metrics.get("test/mDice"),
        output_dir / RESULTS_FILE,
    )
    return results


_task_started = False


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> float | None:
    global _task_started
    _task_started = True
    results = train(cfg)
    return results["metrics"].get(f"test/{cfg.evaluation.monitor.split('/', 1)[-1]}")


def cli() -> None:
    """The command line: like :func:`main`, but Hydra's own errors about the command line (an unknown
    config group option, a mistyped key), which it reports before any run starts, exit with code 2 too."""
    run_hydra_app(main, lambda: _task_started)


if __name__ == "__main__":
    cli()
