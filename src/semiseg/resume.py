"""Resumable runs: the resume checkpoint, RNG states, signal handling and what ``resume=true`` does.

``checkpoints/last.ckpt`` holds everything needed to continue a run as if it had never stopped: weights,
optimizer and scheduler states, the loop position (so ramp-ups continue from the same step), every
callback's state (the best checkpoint so far), the positions of the training loaders
(:mod:`semiseg.data.resumable`) and the random number generators of torch, NumPy and Python.

:class:`ResumeCheckpoint` writes it every ``every_n_train_steps`` steps, at the end of training, and when
the process receives SIGTERM or SIGINT (then the run stops cleanly and exits with ``128 + signal``; a
second Ctrl-C interrupts at once). A checkpoint is only ever written at a step boundary where no
validation is pending, so the resumed run repeats nothing and skips nothing.

What stays nondeterministic: with ``data.num_workers > 0`` the augmentations run in worker processes whose
random state is not saved, so a resumed run continues with freshly seeded workers (same distribution,
other draws); on GPUs, kernels without deterministic implementations differ run to run unless
``trainer.deterministic=true``.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import random
import signal
import time
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from omegaconf import DictConfig, OmegaConf

from semiseg.data.resumable import loaders_at_epoch_end
from semiseg.errors import ConfigError
from semiseg.io import atomic_write_text
from semiseg.results import checkpoint_step, run_identity

log = logging.getLogger("semiseg.resume")

LAST_CHECKPOINT = "last.ckpt"
RNG_KEY = "semiseg_rng_states"
SECONDS_KEY = "semiseg_train_seconds"
RESULT_KEYS = ("method", "dataset", "model", "labeled_ratio", "seed", "split_seed", "metrics", "steps")


# ---- random number generators ------------------------------------------------------------------------
def rng_states() -> dict[str, Any]:
    """The global RNG states of torch (CPU and CUDA), NumPy and Python, as checkpoint-safe values."""
    numpy_state = np.random.get_state()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [numpy_state[0], torch.from_numpy(numpy_state[1].astype(np.int64)), *numpy_state[2:]],
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    kind, keys, *rest = states["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), *rest))
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class RunInterrupted(Exception):
    """Raised after the checkpoint written on a signal; the entry point exits with ``128 + signum``."""

    def __init__(self, signum: int, step: int, checkpoint: Path) -> None:
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        super().__init__(
            f"{signal.Signals(signum).name} at step {step}: state saved to {checkpoint}; "
            "rerun the same command with resume=true to continue"
        )

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


# ---- the checkpoint callback --------------------------------------------------------------------------
class ResumeCheckpoint(ModelCheckpoint):
    """``checkpoints/last.ckpt`` every ``every_n_train_steps`` steps, at the end of training and on
    SIGTERM/SIGINT; the global RNG states ride along in every checkpoint the trainer writes.

    Args:
        dirpath: the run's checkpoint folder.
        every_n_train_steps: steps between checkpoints (0: only at the end and on signals).
        signals: signal names that trigger a checkpoint and a clean stop.
    """

    def __init__(
        self, dirpath: str, every_n_train_steps: int = 100, signals: tuple[str, ...] = ("SIGTERM", "SIGINT")
    ) -> None:
        super().__init__(
            dirpath=dirpath,
            filename="last",
            monitor=None,
            save_top_k=0,
            save_last=True,
            every_n_train_steps=max(0, int(every_n_train_steps)) or None,
            save_on_train_epoch_end=False,
            enable_version_counter=False,
        )
        self.signal_names = tuple(signals)
        self.received_signal: int | None = None
        self.interrupted = False
        self._previous_handlers: dict[int, Any] = {}
        self._deferred = False
        self.seconds_before = 0.0  # training seconds of earlier attempts of this run (from the checkpoint)

    @property
    def state_key(self) -> str:
        return "ResumeCheckpoint"

    @property
    def last_path(self) -> Path:
        return Path(self.dirpath or ".") / LAST_CHECKPOINT

    # -- signals
    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.received_signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received_signal = signum
        log.warning("received %s: writing %s at the end of this step", signal.Signals(signum).name, self.last_path)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for name in self.signal_names:
            number = getattr(signal, name)
            try:
                self._previous_handlers[number] = signal.signal(number, self._on_signal)
            except ValueError:  # not the main thread: leave signals to the caller
                break

    def _restore_signal_handlers(self) -> None:
        for number, handler in self._previous_handlers.items():
            if signal.getsignal(number) == self._on_signal:  # Lightning may have restored its own already
                signal.signal(number, handler)
        self._previous_handlers = {}

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._restore_signal_handlers()

    # -- when to save
    def _validation_pending(self, trainer: L.Trainer) -> bool:
        """Whether validation runs right after this training step (then saving waits for it)."""
        loop = trainer.fit_loop.epoch_loop
        try:
            return bool(trainer.enable_validation and loop._should_check_val_fx(trainer.fit_loop._data_fetcher))
        except (AttributeError, TypeError):  # a Lightning without these internals: save now
            return False

    def _save_and_maybe_stop(self, trainer: L.Trainer) -> None:
        self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        if self.received_signal is not None:
            # stop at once: trainer.should_stop would first run one more validation, which could replace
            # the best checkpoint behind the back of the state just saved
            self.interrupted = True
            raise RunInterrupted(self.received_signal, trainer.global_step, self.last_path)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Lightning calls callbacks' on_train_batch_end before the module's, where methods update state
        # (EMA teachers, queues); the checkpoint must come after those, so it hooks in behind the module's
        if stage != "fit" or getattr(pl_module, "_resume_checkpoint_hooked", False):
            return
        module_hook = pl_module.on_train_batch_end

        def on_train_batch_end_then_checkpoint(*args: Any, **kwargs: Any) -> None:
            module_hook(*args, **kwargs)
            self._after_train_batch(trainer)

        pl_module.on_train_batch_end = on_train_batch_end_then_checkpoint  # type: ignore[method-assign]
        pl_module._resume_checkpoint_hooked = True

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any, **kwargs: Any) -> None:
        return  # see setup: the checkpoint is written after the module's own on_train_batch_end

    def _after_train_batch(self, trainer: L.Trainer) -> None:
        if self.interrupted:
            return
        every = self._every_n_train_steps
        due = self.received_signal is not None or (every and trainer.global_step % every == 0)
        if not due or trainer.sanity_checking or trainer.fast_dev_run:
            return
        if self._validation_pending(trainer):
            self._deferred = True
        else:
            self._save_and_maybe_stop(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or self.interrupted:
            return
        # the validation of the budget's last step saves here too, not at train end: Lightning restores a
        # checkpoint written after that validation at train end one logging step and one epoch late
        at_budget_end = 0 < trainer.max_steps <= trainer.global_step
        if self._deferred or self.received_signal is not None or at_budget_end:
            self._deferred = False
            self._save_and_maybe_stop(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        return  # never on epoch ends: the step schedule decides

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        saved_now = getattr(self, "_saved_step", None) == trainer.global_step  # at this step's validation end
        if not self.interrupted and not trainer.fast_dev_run and trainer.global_step > 0 and not saved_now:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        self._restore_signal_handlers()

    def _save_last_checkpoint(self, trainer: L.Trainer, monitor_candidates: dict[str, Any]) -> None:
        # at the last batch of an epoch the resumed run starts a new epoch, with every training loader
        # iterated afresh: their saved states must say so (semiseg.data.resumable.ResumableDataLoader.state_dict)
        epoch_loop = trainer.fit_loop.epoch_loop
        combined = getattr(trainer.fit_loop, "_combined_loader", None)
        ended = bool(getattr(epoch_loop.batch_progress, "is_last_batch", False))
        with loaders_at_epoch_end(combined.flattened if combined is not None else [], ended):
            super()._save_last_checkpoint(trainer, monitor_candidates)
        self._saved_step = trainer.global_step

    # -- RNG states and the training time so far in every checkpoint
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._fit_started = time.perf_counter()

    @property
    def train_seconds(self) -> float:
        """Seconds of training of the whole run so far: earlier attempts (from the checkpoint) plus this fit."""
        started = getattr(self, "_fit_started", None)
        return self.seconds_before + (time.perf_counter() - started if started is not None else 0.0)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        checkpoint[RNG_KEY] = rng_states()
        checkpoint[SECONDS_KEY] = self.train_seconds

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        if RNG_KEY in checkpoint:
            set_rng_states(checkpoint[RNG_KEY])
        self.seconds_before = float(checkpoint.get(SECONDS_KEY, 0.0))
        if self.dirpath:
            relocate_checkpoint_paths(checkpoint, Path(self.dirpath))


CHECKPOINT_PATH_KEYS = ("best_model_path", "last_model_path", "kth_best_model_path")


def relocate_checkpoint_paths(checkpoint: dict, checkpoint_dir: Path) -> None:
    """Paths inside a run dir are relative to it: a run dir that was moved or copied keeps its best checkpoint.

    ``ModelCheckpoint`` saves absolute paths (its ``dirpath`` and the best checkpoints'); when the checkpoint
    folder is no longer where they point, they are rewritten to the same names in ``checkpoint_dir``, before
    the callbacks load their states (Lightning drops the best-model state of a callback whose dirpath changed)."""
    new_dir = str(Path(checkpoint_dir).resolve())
    for state in (checkpoint.get("callbacks") or {}).values():
        old_dir = state.get("dirpath") if isinstance(state, dict) else None
        if not old_dir or str(Path(old_dir).resolve()) == new_dir:
            continue

        def moved(path: Any, old_dir: str = str(old_dir)) -> Any:
            if isinstance(path, str) and path and Path(path).parent == Path(old_dir):
                return str(Path(new_dir) / Path(path).name)
            return path

        state["dirpath"] = new_dir
        for key in CHECKPOINT_PATH_KEYS:
            if key in state:
                state[key] = moved(state[key])
        if isinstance(state.get("best_k_models"), dict):
            state["best_k_models"] = {moved(path): score for path, score in state["best_k_models"].items()}


def find_resume_callback(trainer: L.Trainer) -> ResumeCheckpoint | None:
    return next((c for c in trainer.callbacks if isinstance(c, ResumeCheckpoint)), None)


# ---- what resume=true does ----------------------------------------------------------------------------
def complete_results(path: Path, cfg: DictConfig) -> dict[str, Any] | None:
    """The run's ``results.json`` when it is complete for ``cfg`` (same run, full budget), else ``None``."""
    try:
        results = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(results, dict) or any(key not in results for key in RESULT_KEYS):
        return None
    expected = run_identity(cfg)
    if any(results[key] != value for key, value in expected.items()):
        return None
    if results["metrics"].get("test/mIoU", "missing") == "missing":
        return None
    max_steps = cfg.trainer.get("max_steps", -1)
    if not cfg.trainer.get("fast_dev_run") and max_steps and max_steps > 0 and results["steps"] < max_steps:
        return None  # the budget grew: continue from last.ckpt
    return results


def last_checkpoint(output_dir: Path) -> Path | None:
    path = Path(output_dir) / "checkpoints" / LAST_CHECKPOINT
    return path if path.is_file() else None


# keys a resumed run may change: the budget, resources, logging and where things are; every other key is the
# run's identity (method, dataset, ratio, seeds, split, model, optimizer, ...)
RESUMABLE_CHANGES = (
    "resume", "num_threads", "sweep_name", "ckpt_path", "task_name", "trainer.max_steps", "trainer.max_epochs",
    "trainer.accelerator", "trainer.devices", "trainer.num_nodes", "trainer.strategy", "trainer.enable_progress_bar",
    "trainer.enable_model_summary", "trainer.log_every_n_steps", "trainer.num_sanity_val_steps",
    "trainer.default_root_dir", "data.num_workers", "callbacks", "logger", "paths", "hydra",
)  # fmt: skip
LOCATION_LEAVES = ("root", "data_dir", "cache_dir", "label_dir", "output_dir", "log_dir", "dirpath")


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        flat: dict[str, Any] = {}
        for key, value in node.items():
            flat.update(_flatten(value, f"{prefix}{key}."))
        return flat or {prefix[:-1]: {}}
    return {prefix[:-1]: node}


def _may_change(key: str) -> bool:
    if key.rsplit(".", 1)[-1] in LOCATION_LEAVES:
        return True
    return any(key == allowed or key.startswith(f"{allowed}.") for allowed in RESUMABLE_CHANGES)


def identity_changes(output_dir: Path, cfg: DictConfig) -> list[str]:
    """The keys whose values ``cfg`` changes against the run in ``output_dir`` (its ``config.yaml``), leaving
    out what a resume may change (:data:`RESUMABLE_CHANGES`); ``[]`` without a ``config.yaml``."""
    path = Path(output_dir) / "config.yaml"
    if not path.is_file():
        return []
    stored = _flatten(OmegaConf.to_container(OmegaConf.load(path), resolve=False))
    current = _flatten(OmegaConf.to_container(cfg, resolve=True))
    keys = sorted(set(stored) | set(current))
    return [k for k in keys if not _may_change(k) and stored.get(k, "<unset>") != current.get(k, "<unset>")]


def check_same_run(output_dir: Path, cfg: DictConfig) -> None:
    """``resume=true`` continues the run in ``output_dir``: a config that changes its identity is refused
    (naming the keys), before anything is written (results that no training produced would replace it)."""
    changed = identity_changes(output_dir, cfg)
    if changed:
        stored = _flatten(OmegaConf.to_container(OmegaConf.load(Path(output_dir) / "config.yaml")))
        current = _flatten(OmegaConf.to_container(cfg, resolve=True))
        shown = ", ".join(f"{k}: {stored.get(k, '<unset>')} -> {current.get(k, '<unset>')}" for k in changed[:6])
        more = f" and {len(changed) - 6} more" if len(changed) > 6 else ""
        raise ConfigError(
            f"resume=true into hydra.run.dir={output_dir}, a run of another configuration ({shown}{more}); "
            "resume with the run's own settings (only the budget, resources and logging may change), or choose a "
            "new directory"
        )


def checkpoint_files(output_dir: Path) -> list[Path]:
    """The ``.ckpt`` files in the run's ``checkpoints/`` folder."""
    folder = Path(output_dir) / "checkpoints"
    return sorted(folder.glob("*.ckpt")) if folder.is_dir() else []


def remove_checkpoints_after(output_dir: Path, step: int) -> list[Path]:
    """Remove the step-named checkpoints (``best-step<k>.ckpt``) of steps after ``step``: they come from the
    part of a killed attempt that the resumed run trains again (it would save them again beside the old ones)."""
    removed = []
    for path in checkpoint_files(output_dir):
        saved_at = checkpoint_step(path) if path.name != LAST_CHECKPOINT else None
        if saved_at is not None and saved_at > step:
            path.unlink()
            removed.append(path)
    return removed


# ---- the metrics of a resumed run ---------------------------------------------------------------------
class _ContinuingWriter(ExperimentWriter):
    """Lightning's CSV writer, except that with ``continue_existing`` the run's ``metrics.csv`` is continued
    instead of deleted: its rows are kept up to the first step the resumed run logs (rows logged after the
    checkpoint the run resumes from are logged again) and so are its test results (a finished run whose budget
    grew), and the header grows to the union of both runs' keys."""

    def __init__(self, log_dir: str, continue_existing: bool) -> None:
        self._continue_existing = continue_existing
        self._previous_rows: list[dict[str, str]] | None = None
        super().__init__(log_dir=log_dir)

    def _check_log_dir_exists(self) -> None:
        if not (self._continue_existing and self._fs.isfile(self.metrics_file_path)):
            super()._check_log_dir_exists()
            return
        with self._fs.open(self.metrics_file_path, "r", newline="") as file:
            reader = csv.DictReader(file)
            self._previous_rows = list(reader)
            self.metrics_keys = sorted(reader.fieldnames or [])

    def save(self) -> None:
        if self._previous_rows is not None and self.metrics:
            first_new_step = min(int(row["step"]) for row in self.metrics)
            kept = [row for row in self._previous_rows if _before(row, first_new_step) or _test_only(row)]
            self._record_new_keys()
            text = io.StringIO()
            writer = csv.DictWriter(text, fieldnames=self.metrics_keys)
            writer.writeheader()
            writer.writerows(kept)
            atomic_write_text(Path(self.metrics_file_path), text.getvalue())
            self._previous_rows = None
        super().save()


def _before(row: dict[str, str], step: int) -> bool:
    return bool(row.get("step")) and float(row["step"]) < step


def _test_only(row: dict[str, str]) -> bool:
    """A row of test metrics: logged after a finished fit, never again by the resumed one."""
    logged = [key for key, value in row.items() if value not in ("", None) and key not in ("step", "epoch")]
    return bool(logged) and all(key.startswith("test/") for key in logged)


class ContinuingCSVLogger(CSVLogger):
    """:class:`~lightning.pytorch.loggers.CSVLogger` that continues ``metrics.csv`` when the run resumes.

    Lightning's CSV logger deletes an existing ``metrics.csv``, so a resumed run would lose the metrics of
    every step before the resume. ``train`` sets ``continue_existing`` when it resumes from ``last.ckpt``;
    a new run in an empty directory writes a fresh file as Lightning does.
    """

    def __init__(self, *args: Any, continue_existing: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.continue_existing = continue_existing

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ContinuingWriter(self.log_dir, self.continue_existing)
        return self._experiment
