"""What the terminal shows: progress counted in optimisation steps, and no messages the user cannot act on.

Training is budgeted in steps (``trainer.max_steps``), while Lightning's bars count epochs (``Epoch 4/-2``
with ``max_epochs=-1``). On a terminal, :class:`StepProgressBar` shows one bar over the whole budget: steps
done / ``max_steps``, rate and ETA. When output goes to a file or pipe, :class:`StepProgressLog` writes one
line every ``every_n_steps`` steps instead of redrawing a bar.
"""

from __future__ import annotations

import logging
import sys
import time
import warnings
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ProgressBar, TQDMProgressBar

log = logging.getLogger("semiseg.progress")

# third-party messages the user cannot act on: library deprecations, advertisements, and hints that do not
# apply to a step-budgeted run with two checkpoint callbacks
UNACTIONABLE_WARNINGS = (
    r".*isinstance\(treespec, LeafSpec\)` is deprecated.*",
    r".*is called with Trainer configured with multiple `ModelCheckpoint` callbacks.*",
    r"The number of training batches \(\d+\) is smaller than the logging interval.*",
    r".*Total length of `DataLoader` across ranks is zero.*",
)
ADVERTISEMENT_PREFIX = "💡 Tip:"
RANK_ZERO_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")


class _DropAdvertisements(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(ADVERTISEMENT_PREFIX)


def silence_unactionable() -> None:
    """Filter the third-party warnings and "Tip" advertisements a run would print that the user cannot act on."""
    for pattern in UNACTIONABLE_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    for name in RANK_ZERO_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropAdvertisements) for f in logger.filters):
            logger.addFilter(_DropAdvertisements())


def format_duration(seconds: float) -> str:
    """``3725`` -> ``1h02m05s``; ``65`` -> ``1m05s``; ``4.2`` -> ``4s``."""
    seconds = round(max(0.0, seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _budget(trainer: L.Trainer) -> int | None:
    max_steps = trainer.max_steps
    return int(max_steps) if max_steps and max_steps > 0 else None


class StepProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar, with the training bar over the step budget: ``step 40/600 [rate, ETA] epoch 3``.

    Validation and test bars are Lightning's."""

    def on_train_start(self, trainer: L.Trainer, *_: Any) -> None:
        self.train_progress_bar = self.init_train_tqdm()
        self.train_progress_bar.reset(total=_budget(trainer))
        self.train_progress_bar.initial = trainer.global_step  # a resumed run starts where it stopped
        self.train_progress_bar.n = trainer.global_step
        self.train_progress_bar.set_description("step")

    def on_train_epoch_start(self, trainer: L.Trainer, *_: Any) -> None:
        self.train_progress_bar.set_description(f"step (epoch {trainer.current_epoch})")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *_: Any, **__: Any) -> None:
        step = trainer.global_step
        if self.train_progress_bar is not None and self._should_update(step, self.train_progress_bar.total or 0):
            self.train_progress_bar.n = step
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.train_progress_bar.disable:
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))


class StepProgressLog(ProgressBar):
    """For a log file: one line every ``every_n_steps`` steps (and at the last) instead of a redrawn bar::

        step 40/600 (6.7%)  2.31 steps/s  ETA 4m02s  epoch 3  train/loss=0.8123

    Args:
        every_n_steps: steps between lines.
    """

    def __init__(self, every_n_steps: int = 50) -> None:
        super().__init__()
        self.every_n_steps = max(1, int(every_n_steps))
        self._enabled = True
        self._start_time = 0.0
        self._start_step = 0

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start_time, self._start_step = time.perf_counter(), trainer.global_step

    def line(self, trainer: L.Trainer, pl_module: L.LightningModule) -> str:
        """The progress line at the trainer's current step."""
        step, budget = trainer.global_step, _budget(trainer)
        elapsed = time.perf_counter() - self._start_time
        rate = (step - self._start_step) / elapsed if elapsed > 0 else 0.0
        parts = [f"step {step}/{budget} ({100.0 * step / budget:.1f}%)" if budget else f"step {step}"]
        parts.append(f"{rate:.2f} steps/s" if rate >= 0.1 else f"{1 / rate:.1f} s/step" if rate > 0 else "")
        if budget and rate > 0:
            parts.append(f"ETA {format_duration((budget - step) / rate)}")
        parts.append(f"epoch {trainer.current_epoch}")
        metrics = self.get_metrics(trainer, pl_module)
        parts += [f"{key}={_short(value)}" for key, value in metrics.items() if key.startswith("train/")]
        return "  ".join(part for part in parts if part)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *_: Any, **__: Any) -> None:
        step = trainer.global_step
        if self._enabled and trainer.is_global_zero and (step % self.every_n_steps == 0 or step == _budget(trainer)):
            log.info("%s", self.line(trainer, pl_module))


def progress_bar(refresh_rate: int = 1, log_every_n_steps: int = 50, is_terminal: bool | None = None) -> ProgressBar:
    """A step bar on a terminal; a progress line every ``log_every_n_steps`` steps when output goes to a file."""
    if sys.stdout.isatty() if is_terminal is None else is_terminal:
        return StepProgressBar(refresh_rate=refresh_rate)
    return StepProgressLog(every_n_steps=log_every_n_steps)
