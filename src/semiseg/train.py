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
from hydra.core.hydra_config import HydraConfig
from hydra.utils import get_method
from omegaconf import DictConfig, OmegaConf

from semiseg import sweeps
from semiseg.checkpoints import check_training_checkpoint
from semiseg.config import CONFIG_DIR
from semiseg.errors import ConfigError, exit_on_user_error, run_hydra_app
from semiseg.io import atomic_write_text
from semiseg.results import RESULTS_FILE
from semiseg.resume import check_same_run, checkpoint_files, complete_results, last_checkpoint, remove_checkpoints_after
from semiseg.runner import fit_and_test

sweeps.register_resolvers()

log = logging.getLogger("semiseg.train")

HYDRA_SUBDIR = ".hydra"  # where Hydra would write its record of the run
MAX_SEED = 2**32 - 1  # numpy's and Lightning's seed_everything's limit


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
        if not 0 <= value <= MAX_SEED:
            raise ConfigError(f"{key}={value} must lie in 0..{MAX_SEED} (the seed of every generator), e.g. {key}=5")
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
    if ckpt_path and ckpt_path not in ("last", "best"):
        check_training_checkpoint(Path(ckpt_path), list(cfg.dataset.class_names), int(cfg.dataset.in_channels))
    check_validation(cfg)


def monitor_keys(cfg: DictConfig) -> list[str]:
    """The validation keys every method logs (``evaluation.monitor`` picks one; ``train/...`` keys also do)."""
    names = list(cfg.dataset.class_names)
    background = int(cfg.evaluation.get("background_index", 0))
    keys = ["loss", "mIoU", "mDice", "mIoU_all", "pixel_acc", *(f"IoU/{name}" for name in names)]
    keys += [f"Dice/{name}" for index, name in enumerate(names) if index != background]
    if cfg.evaluation.get("per_batch_metrics"):
        keys += ["mIoU_batch", "mDice_batch"]
    return [f"val/{key}" for key in keys]


def check_validation(cfg: DictConfig) -> None:
    """Model selection must be possible: a known ``evaluation.monitor`` and a validation within the budget."""
    monitor = str(cfg.evaluation.get("monitor"))
    if not monitor.startswith("train/") and monitor not in monitor_keys(cfg):
        known = ", ".join(key for key in monitor_keys(cfg) if "/IoU/" not in key and "/Dice/" not in key)
        raise ConfigError(
            f"evaluation.monitor={monitor} is not a logged value; use one of {known}, val/IoU/<class> or "
            "val/Dice/<class>"
        )
    max_steps, interval = cfg.trainer.get("max_steps", -1), cfg.trainer.get("val_check_interval")
    if (
        isinstance(interval, int) and not isinstance(interval, bool)
        and isinstance(max_steps, int) and max_steps > 0 and interval > max_steps
        and not cfg.trainer.get("fast_dev_run")
    ):  # fmt: skip
        raise ConfigError(
            f"trainer.val_check_interval={interval} > trainer.max_steps={max_steps}: no validation would run, so "
            f"no model would be selected; use trainer.val_check_interval={max_steps} or less"
        )


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
        write_hydra_files(Path(cfg.paths.output_dir), cfg)
        return get_method(cfg.method.driver)(cfg)
    if cfg.get("driver"):  # experiments that run several fits (experiment=active_learning)
        return get_method(cfg.driver)(cfg)
    output_dir = Path(cfg.paths.output_dir)
    if cfg.get("resume", False):
        check_same_run(output_dir, cfg)  # a changed identity is refused before anything is written
    action, ckpt_path, finished = resume_point(cfg, output_dir)
    if action == "trained" and ((output_dir / RESULTS_FILE).exists() or last_checkpoint(output_dir) is not None):
        raise ConfigError(
            f"hydra.run.dir={output_dir} already holds another run (results.json or checkpoints/last.ckpt); "
            "choose a new directory, or add resume=true to continue that run"
        )
    sweeps.LAST_ACTION["action"] = action
    if finished is not None:
        log.info("resume: %s is complete, skipping this run", output_dir / RESULTS_FILE)
        return finished
    output_dir.mkdir(parents=True, exist_ok=True)
    write_hydra_files(output_dir, cfg)
    if action == "resumed":
        step = int(torch.load(ckpt_path, map_location="cpu", weights_only=False, mmap=True)["global_step"])
        removed = remove_checkpoints_after(output_dir, step)
        log.info("resume: continuing from %s (step %d)%s", ckpt_path, step, _removed(removed, "of later steps"))
    elif cfg.get("resume", False) and checkpoint_files(output_dir):
        every = (cfg.get("callbacks") or {}).get("resume_checkpoint", {}).get("every_n_train_steps")
        stale = checkpoint_files(output_dir)
        for path in stale:
            path.unlink()
        log.warning(
            "resume: %s has no checkpoints/last.ckpt (the run stopped before its first one, written every %s steps): "
            "training again from step 0%s",
            output_dir, every, _removed(stale, "of the stopped attempt"),
        )  # fmt: skip
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


def _removed(paths: list[Path], which: str) -> str:
    return f"; removed {len(paths)} checkpoint(s) {which}: {', '.join(p.name for p in paths)}" if paths else ""


def write_hydra_files(run_dir: Path, cfg: DictConfig) -> None:
    """Hydra's record of the run (``.hydra/config.yaml``, ``hydra.yaml``, ``overrides.yaml``), written here once
    the run is accepted (``hydra.output_subdir: null`` stops Hydra from writing them before the checks, so a
    refused run leaves an existing run's record alone). Nothing outside a Hydra app (``train(cfg)`` in tests)."""
    if not HydraConfig.initialized():
        return
    hydra_cfg = HydraConfig.get()
    folder = Path(run_dir) / HYDRA_SUBDIR
    atomic_write_text(folder / "config.yaml", OmegaConf.to_yaml(cfg))
    atomic_write_text(folder / "hydra.yaml", OmegaConf.to_yaml(OmegaConf.create({"hydra": hydra_cfg})))
    atomic_write_text(folder / "overrides.yaml", OmegaConf.to_yaml(hydra_cfg.overrides.task))


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
