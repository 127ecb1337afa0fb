"""The training entry point: ``python -m semiseg.train [overrides]``.

seed -> dataset -> DataModule (split written as ``split.json``) -> method module -> callbacks, loggers,
trainer -> fit -> test with the best checkpoint -> ``results.json``. Everything comes from the Hydra
config in ``conf/`` (``conf/train.yaml`` lists the groups).
"""

from __future__ import annotations

import logging
import math
import pickle
import re
import sys
import time
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.utils import get_class, get_method, instantiate
from lightning.pytorch.callbacks import LearningRateMonitor
from omegaconf import DictConfig, OmegaConf

from semiseg import sweeps
from semiseg.errors import ConfigError, exit_on_user_error, run_hydra_app
from semiseg.io import AtomicCheckpointIO, atomic_write_json, atomic_write_text
from semiseg.results import run_identity
from semiseg.resume import ContinuingCSVLogger, RunInterrupted, complete_results, last_checkpoint
from semiseg.wandb_logging import finish_run

sweeps.register_resolvers()

log = logging.getLogger("semiseg.train")

CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "conf")
RESULTS_FILE = "results.json"
SPLIT_FILE = "split.json"
CONFIG_FILE = "config.yaml"


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


def build_datamodule(cfg: DictConfig, method_class: type) -> Any:
    dataset = instantiate(cfg.dataset.source, _convert_="all")
    return instantiate(
        cfg.data,
        dataset=dataset,
        use_unlabeled=method_class.uses_unlabeled,
        unlabeled_views=list(method_class.unlabeled_views),
        _convert_="all",
    )


def build_module(cfg: DictConfig) -> Any:
    module = instantiate(
        cfg.method,
        model=cfg.model,
        class_names=list(cfg.dataset.class_names),
        in_channels=cfg.dataset.in_channels,
        ignore_index=cfg.dataset.ignore_index,
        optimizer=cfg.optimizer,
        scheduler=cfg.get("scheduler"),
        loss=cfg.loss,
        evaluation=cfg.evaluation,
        numerics=cfg.get("numerics"),
        _recursive_=False,
        _convert_="all",  # plain containers: hyperparameters pickle cleanly and checkpoints load weights_only
    )
    divisor = getattr(module.inference_network, "size_divisor", 1)
    height, width = cfg.dataset.image_size
    if height % divisor or width % divisor:
        fixed = [max(divisor, side // divisor * divisor) for side in (height, width)]
        raise ConfigError(
            f"dataset.image_size=[{height},{width}] must be a multiple of {divisor} for model={cfg.model.name}; "
            f"e.g. dataset.image_size=[{fixed[0]},{fixed[1]}]"
        )
    return module


def apply_performance(module: Any, performance: DictConfig | None) -> Any:
    """Opt-in fast paths: ``channels_last`` memory format and ``torch.compile`` of every trainable network
    (with ``compile_fallback: true``, a network that fails to compile runs eagerly instead of failing the run)."""
    if not performance:
        return module
    if performance.get("channels_last"):
        module = module.to(memory_format=torch.channels_last)
    if performance.get("compile"):
        if performance.get("compile_fallback", True):
            torch._dynamo.config.suppress_errors = True
        for name, child in list(module.named_children()):
            if any(p.requires_grad for p in child.parameters()):
                setattr(module, name, torch.compile(child, mode=performance.get("compile_mode")))
    return module


def build_list(group: DictConfig | None) -> list[Any]:
    """Instantiate every entry of a callbacks/logger group that has a ``_target_``."""
    if not group:
        return []
    return [instantiate(node, _convert_="all") for node in group.values() if node and "_target_" in node]


def _number(value: Any) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def _best_step(path: str) -> int | None:
    """The step in a checkpoint name ``best-step<k>.ckpt`` (names avoid ``=``, which Hydra overrides reserve)."""
    match = re.search(r"step=?(\d+)", Path(path).stem)
    return int(match.group(1)) if match else None


def make_results(
    cfg: DictConfig,
    module: Any,
    datamodule: Any,
    trainer: L.Trainer,
    test_metrics: dict,
    train_seconds: float,
    output_dir: Path,
) -> dict[str, Any]:
    checkpoint = trainer.checkpoint_callback
    best_path = getattr(checkpoint, "best_model_path", "") or ""
    best_score = getattr(checkpoint, "best_model_score", None)
    return {
        **run_identity(cfg),
        "num_params": int(module.num_params),
        "num_params_train": int(module.num_params_train),
        "split": datamodule.split.sizes(),
        "metrics": {key: _number(value) for key, value in sorted(test_metrics.items()) if key.startswith("test/")},
        "best_val": {
            "metric": cfg.evaluation.monitor,
            "value": _number(best_score) if best_score is not None else None,
            "step": _best_step(best_path),
        },
        "steps": int(trainer.global_step),
        "train_seconds": round(train_seconds, 3),
        "checkpoint": str(Path(best_path).resolve().relative_to(output_dir.resolve())) if best_path else None,
        "config": CONFIG_FILE,
    }


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


def test_best(trainer: L.Trainer, module: Any, datamodule: Any, best: str) -> list[dict]:
    """Test the best checkpoint (the module as it is without one), loading it with ``weights_only=True``
    unless it holds more than tensors and plain containers (a method's extra state may)."""
    if not best:
        return trainer.test(module, datamodule=datamodule)
    try:
        return trainer.test(module, datamodule=datamodule, ckpt_path="best", weights_only=True)
    except pickle.UnpicklingError:
        log.info("%s holds more than weights; loading it with weights_only=False (it is this run's own file)", best)
        return trainer.test(module, datamodule=datamodule, ckpt_path="best", weights_only=False)


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
    threads = sweeps.resolve_num_threads(cfg.get("num_threads", "auto"))
    torch.set_num_threads(threads)
    log.info("torch threads: %d", threads)
    L.seed_everything(cfg.seed, workers=True)

    method_class = get_class(cfg.method._target_)
    datamodule = build_datamodule(cfg, method_class)
    datamodule.save_split(output_dir / SPLIT_FILE)
    log.info("split %s", datamodule.split.sizes())
    module = apply_performance(build_module(cfg), cfg.get("performance"))

    callbacks = build_list(cfg.get("callbacks"))
    loggers = build_list(cfg.get("logger"))
    for logger in loggers:
        if isinstance(logger, ContinuingCSVLogger):
            logger.continue_existing = action == "resumed"
    if not loggers:  # logger=none: callbacks that only feed a logger have nothing to write to
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    trainer: L.Trainer = instantiate(
        cfg.trainer, callbacks=callbacks, logger=loggers or False, plugins=[AtomicCheckpointIO()], _convert_="all"
    )
    atomic_write_text(output_dir / CONFIG_FILE, OmegaConf.to_yaml(cfg, resolve=True))
    for logger in loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))

    started = time.perf_counter()
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=False)
    except RunInterrupted as stop:
        log.warning("%s", stop)
        sys.exit(stop.exit_code)
    train_seconds = time.perf_counter() - started

    best = getattr(trainer.checkpoint_callback, "best_model_path", "") if trainer.checkpoint_callback else ""
    tested = test_best(trainer, module, datamodule, best)
    results = make_results(cfg, module, datamodule, trainer, tested[0] if tested else {}, train_seconds, output_dir)
    if trainer.is_global_zero:  # under DDP every rank holds the same synchronised metrics; one writes
        atomic_write_json(output_dir / RESULTS_FILE, results)
        finish_run(loggers, results)
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
