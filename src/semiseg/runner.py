"""The run engine: build the parts of a run from its config, fit, test the best checkpoint, make ``results.json``.

:func:`fit_and_test` is the one fit of the suite: ``semiseg.train`` calls it once per run, the self-training
driver once per student. The builders (:func:`build_datamodule`, :func:`build_module`, :func:`apply_performance`,
:func:`build_callbacks`, :func:`build_loggers`) are also what the benchmarks use to time a method's steps.
``train.py`` keeps what belongs to the command line only: the config checks, the resume policy, the dispatch.
"""

from __future__ import annotations

import logging
import pickle
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import get_class, instantiate
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig, OmegaConf

from semiseg import sweeps
from semiseg.errors import ConfigError, check_choice
from semiseg.io import AtomicCheckpointIO, atomic_write_json, atomic_write_text
from semiseg.models.perturbations import use_uniform_mask_dropout
from semiseg.results import CONFIG_FILE, SPLIT_FILE, checkpoint_step, make_results
from semiseg.resume import ContinuingCSVLogger, RunInterrupted, find_resume_callback
from semiseg.wandb_logging import finish_run

log = logging.getLogger("semiseg.train")

CPU_DROPOUT = ("uniform_mask", "native")


def build_datamodule(cfg: DictConfig, method_class: type) -> Any:
    """The DataModule of ``cfg.data`` over ``cfg.dataset``, producing the unlabeled views ``method_class`` needs."""
    dataset = instantiate(cfg.dataset.source, _convert_="all")
    return instantiate(
        cfg.data,
        dataset=dataset,
        use_unlabeled=method_class.uses_unlabeled,
        unlabeled_views=list(method_class.views_for(cfg.method)),
        _convert_="all",
    )


def build_module(cfg: DictConfig) -> Any:
    """The method's LightningModule (``cfg.method``) with its network, loss, optimizer and evaluation settings."""
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
    if cfg.data.get("crop_size") is None and (height % divisor or width % divisor):  # crops: the window is checked
        fixed = [max(divisor, side // divisor * divisor) for side in (height, width)]
        raise ConfigError(
            f"dataset.image_size=[{height},{width}] must be a multiple of {divisor} for model={cfg.model.name}; "
            f"e.g. dataset.image_size=[{fixed[0]},{fixed[1]}]"
        )
    return module


def apply_performance(module: Any, performance: DictConfig | None) -> Any:
    """Fast paths: ``channels_last`` memory format, ``cpu_dropout`` (``uniform_mask``: every ``nn.Dropout``
    becomes :class:`~semiseg.models.perturbations.UniformMaskDropout`, the same distribution drawn faster on the
    CPU; ``native``: left as is) and ``torch.compile`` of every trainable network (with ``compile_fallback:
    true``, a network that fails to compile runs eagerly instead of failing the run)."""
    if not performance:
        return module
    cpu_dropout = check_choice("performance.cpu_dropout", performance.get("cpu_dropout", "native"), CPU_DROPOUT)
    if cpu_dropout == "uniform_mask":
        use_uniform_mask_dropout(module)
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


def build_loggers(cfg: DictConfig, resuming: bool = False) -> list[Logger]:
    """The loggers of ``cfg.logger``; a CSV logger continues its ``metrics.csv`` when the run resumes."""
    loggers = build_list(cfg.get("logger"))
    for logger in loggers:
        if isinstance(logger, ContinuingCSVLogger):
            logger.continue_existing = resuming
    return loggers


def build_callbacks(cfg: DictConfig, loggers: list[Logger]) -> list[L.Callback]:
    """The callbacks of ``cfg.callbacks``; without a logger (``logger=none``) the ones that only feed a logger
    (the learning-rate monitor) are left out, since Lightning refuses them."""
    callbacks = build_list(cfg.get("callbacks"))
    if not loggers:
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    return callbacks


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


def best_validation(trainer: L.Trainer, module: Any, datamodule: Any, monitor: str) -> tuple[str, Any, int | None]:
    """``(best checkpoint path, its monitored value, its step)``. Without a best checkpoint (``fast_dev_run``
    saves none) the final weights are validated and count as the best, at the last step."""
    checkpoint = trainer.checkpoint_callback
    path = getattr(checkpoint, "best_model_path", "") or "" if checkpoint else ""
    if path:
        return path, checkpoint.best_model_score, checkpoint_step(path)
    validated = trainer.validate(module, datamodule=datamodule, verbose=False)
    return "", (validated[0].get(monitor) if validated else None), int(trainer.global_step)


def fit_and_test(
    cfg: DictConfig,
    run_dir: Path,
    *,
    datamodule: Any | None = None,
    ckpt_path: str | None = None,
    resuming: bool = False,
    results_file: str | None = None,
    weights_file: str | None = None,
) -> dict[str, Any]:
    """Fit the method of ``cfg`` in ``run_dir``, test its best checkpoint and return ``results.json``'s content.

    Sets the torch threads (``num_threads``) and the seed (``cfg.seed``), builds the DataModule (unless one is
    given, as the self-training driver does; a new one writes ``split.json``), the module with the
    ``performance`` fast paths, the loggers, callbacks and trainer; writes ``config.yaml``; fits from
    ``ckpt_path`` (``resuming``: the CSV log continues); tests the best checkpoint. On the global-zero process
    only, ``results_file`` (a name in ``run_dir``) receives the results, ``weights_file`` the tested weights'
    ``state_dict``, and W&B runs are finished. A run stopped by a signal exits with ``128 + signum``.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    threads = sweeps.resolve_num_threads(cfg.get("num_threads", "auto"))
    torch.set_num_threads(threads)
    log.info("torch threads: %d", threads)
    L.seed_everything(cfg.seed, workers=True)

    if datamodule is None:
        datamodule = build_datamodule(cfg, get_class(cfg.method._target_))
        datamodule.save_split(run_dir / SPLIT_FILE)
        log.info("split %s", datamodule.split.sizes())
    if datamodule.split.sizes()["val"] == 0 and not cfg.trainer.get("fast_dev_run"):
        log.warning(
            "no validation images (dataset.val_fraction=%s): no model selection, the last model is tested and "
            "results.json has checkpoint: null; set dataset.val_fraction > 0 to select the best model",
            cfg.dataset.get("val_fraction"),
        )
    module = apply_performance(build_module(cfg), cfg.get("performance"))
    loggers = build_loggers(cfg, resuming)
    callbacks = build_callbacks(cfg, loggers)
    trainer: L.Trainer = instantiate(
        cfg.trainer, callbacks=callbacks, logger=loggers or False, plugins=[AtomicCheckpointIO()], _convert_="all"
    )
    atomic_write_text(run_dir / CONFIG_FILE, OmegaConf.to_yaml(cfg, resolve=True))
    for logger in loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))

    started = time.perf_counter()
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=False)
    except RunInterrupted as stop:
        log.warning("%s", stop)
        sys.exit(stop.exit_code)
    train_seconds = time.perf_counter() - started
    resume_callback = find_resume_callback(trainer)
    if resume_callback is not None:  # a resumed run counts the training time of its earlier attempts too
        train_seconds += resume_callback.seconds_before

    best_path, best_value, best_step = best_validation(trainer, module, datamodule, cfg.evaluation.monitor)
    tested = test_best(trainer, module, datamodule, best_path)
    results = make_results(
        cfg,
        test_metrics=tested[0] if tested else {},
        best_checkpoint=best_path,
        best_value=best_value,
        best_step=best_step,
        steps=trainer.global_step,
        train_seconds=train_seconds,
        num_params=module.num_params,
        num_params_train=module.num_params_train,
        split_sizes=datamodule.split.sizes(),
        output_dir=run_dir,
    )
    if trainer.is_global_zero:  # under DDP every rank holds the same synchronised metrics; one writes
        if results_file:
            atomic_write_json(run_dir / results_file, results)
        if weights_file:
            torch.save(module.state_dict(), run_dir / weights_file)  # the tested (best) weights
        finish_run(loggers, results)
    return results
