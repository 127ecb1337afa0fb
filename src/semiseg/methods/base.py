"""The base LightningModule of every method.

:class:`SemiSupervisedModule` owns everything methods share: building networks from the ``model``
config, the supervised loss, the optimizer and scheduler, validation and test metrics, and logging.
A method subclass says only what is new:

* ``uses_unlabeled`` / ``unlabeled_views`` (class attributes): whether it consumes unlabeled batches
  and which views of each unlabeled image the DataModule must produce;
* :meth:`configure_networks`: the networks it trains (default: one network ``self.net``);
* :meth:`unsupervised_loss`: its loss on the unlabeled batch, and named terms to log;
* optionally :meth:`supervised_loss` (e.g. averaged over several decoders), :meth:`predict_logits`
  and :attr:`inference_network` (what runs at validation, test and deployment).

The training step is ``loss = supervised_loss(labeled) + unsupervised_loss(unlabeled)``; every term the
method returns is logged as ``train/<name>``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from semiseg.errors import ConfigError, SemiSegError
from semiseg.losses import ce_dice_loss, class_weight_tensor
from semiseg.metrics import SegmentationMetrics
from semiseg.models.base import SegmentationNetwork, count_trainable_parameters
from semiseg.ramps import sigmoid_rampup

Batch = dict[str, Any]


class NonFiniteLossError(SemiSegError, FloatingPointError):
    """A training loss became NaN or Inf; the message names the term and the step."""


LossTerms = dict[str, torch.Tensor]


def _plain(config: Any) -> Any:
    """OmegaConf containers -> plain Python (so hyperparameters pickle and print cleanly)."""
    if isinstance(config, DictConfig) or OmegaConf.is_config(config):
        return OmegaConf.to_container(config, resolve=True)
    return config


class SemiSupervisedModule(L.LightningModule):
    """Shared base of all methods.

    Args:
        model: the network config (``_target_`` and its arguments, without ``in_channels`` and
            ``num_classes``, which come from the dataset).
        class_names: all class names of the dataset, background first.
        in_channels: image channels.
        ignore_index: target value of unlabeled pixels.
        optimizer: a partial optimizer config (``_target_``, ``_partial_: true``, ``lr``, ...).
        scheduler: ``None`` or ``{"scheduler": <partial scheduler config>, "interval", "frequency",
            "monitor", "strict"}`` (Lightning's lr-scheduler dict).
        loss: supervised loss settings: ``ce_weight``, ``dice_weight``, ``class_weights``.
        evaluation: ``monitor``, ``mode``, ``background_index``, ``per_batch_metrics``.
        numerics: what a non-finite (NaN or Inf) training loss does: ``on_nonfinite: stop`` (default: save a
            debug checkpoint and stop with a message naming the loss term and the step) or ``skip`` (skip the
            batch's update and count it in ``train/skipped_batches``; ``max_skipped`` stops the run after that many).
        name: the method's name (for logs and ``results.json``).
    """

    uses_unlabeled: ClassVar[bool] = True
    unlabeled_views: ClassVar[tuple[str, ...]] = ("image",)

    def __init__(
        self,
        model: Mapping[str, Any],
        class_names: Sequence[str],
        in_channels: int,
        ignore_index: int = 255,
        optimizer: Mapping[str, Any] | None = None,
        scheduler: Mapping[str, Any] | None = None,
        loss: Mapping[str, Any] | None = None,
        evaluation: Mapping[str, Any] | None = None,
        numerics: Mapping[str, Any] | None = None,
        name: str | None = None,
        **method_options: Any,
    ) -> None:
        super().__init__()
        if method_options:
            raise ConfigError(
                f"method '{name or type(self).__name__}' has no option(s) {sorted(method_options)}; "
                "check the spelling of method.<key> overrides"
            )
        # plain containers only, so that checkpoints load with torch.load(weights_only=True)
        model, optimizer, scheduler, loss, evaluation, numerics = map(
            _plain, (model, optimizer, scheduler, loss, evaluation, numerics)
        )
        class_names = list(class_names)
        self.save_hyperparameters(logger=False)
        self.model_config = dict(_plain(model))
        self.model_name = self.model_config.pop("name", None)
        self.class_names = list(class_names)
        self.num_classes = len(self.class_names)
        self.in_channels = in_channels
        self.ignore_index = ignore_index
        self.optimizer_config = _plain(optimizer) or {"_target_": "torch.optim.Adam", "_partial_": True, "lr": 1e-3}
        self.scheduler_config = _plain(scheduler)
        loss = dict(_plain(loss) or {})
        self.ce_weight = float(loss.get("ce_weight", 0.5))
        self.dice_weight = float(loss.get("dice_weight", 0.5))
        weights = class_weight_tensor(loss.get("class_weights"), self.num_classes)
        self.register_buffer("class_weights", weights if weights is not None else torch.empty(0), persistent=False)
        evaluation = dict(_plain(evaluation) or {})
        numerics = dict(_plain(numerics) or {})
        self.on_nonfinite = str(numerics.get("on_nonfinite", "stop"))
        if self.on_nonfinite not in ("stop", "skip"):
            raise ConfigError(f"numerics.on_nonfinite={self.on_nonfinite!r} must be 'stop' or 'skip'")
        self.max_skipped = numerics.get("max_skipped")
        self.skipped_batches = 0
        self.method_name = name or type(self).__name__.lower()
        metric_args = {
            "class_names": self.class_names,
            "ignore_index": ignore_index,
            "background_index": int(evaluation.get("background_index", 0)),
            "per_batch": bool(evaluation.get("per_batch_metrics", False)),
        }
        self.val_metrics = SegmentationMetrics(**metric_args)
        self.test_metrics = SegmentationMetrics(**metric_args)
        self.configure_networks()

    # ---- what a method defines ----------------------------------------------------------------
    def configure_networks(self) -> None:
        """Build the networks; the default is one network ``self.net`` from the ``model`` config."""
        self.net = self.build_network()

    def unsupervised_loss(self, unlabeled: Batch, labeled: Batch) -> tuple[torch.Tensor, LossTerms]:
        """The method's loss on the unlabeled batch and the named terms to log."""
        raise NotImplementedError(f"{type(self).__name__} uses unlabeled data but defines no unsupervised_loss")

    @property
    def inference_network(self) -> nn.Module:
        """The network that runs at validation, test and deployment (its size is ``num_params``)."""
        return self.net

    def predict_logits(self, image: torch.Tensor) -> torch.Tensor:
        """``image (B, C, H, W)`` -> logits ``(B, num_classes, H, W)`` of the inference network."""
        return self.inference_network(image)

    # ---- helpers for methods ------------------------------------------------------------------
    def build_network(self, **overrides: Any) -> SegmentationNetwork:
        """A new network from the ``model`` config, with the dataset's channels and classes."""
        config = {**self.model_config, **overrides}
        return instantiate(config, in_channels=self.in_channels, num_classes=self.num_classes, _convert_="all")

    def seg_loss(self, logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """The supervised loss ``ce_weight * CE + dice_weight * Dice`` (0.5 each by default)."""
        return ce_dice_loss(
            logits,
            target,
            ignore_index=self.ignore_index,
            weight=weight,
            class_weights=self.class_weights if self.class_weights.numel() else None,
            ce_weight=self.ce_weight,
            dice_weight=self.dice_weight,
        )

    def supervised_loss(self, labeled: Batch) -> tuple[torch.Tensor, LossTerms]:
        """Loss on the labeled batch; the default trains ``self.net``."""
        loss = self.seg_loss(self.net(labeled["image"]), labeled["mask"])
        return loss, {}

    def rampup(self, length: float) -> float:
        """Sigmoid ramp-up ``exp(-5 (1 - t/T)^2)`` at the current optimisation step ``t`` (``T`` in steps)."""
        return sigmoid_rampup(self.global_step, length)

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        return (p for p in self.parameters() if p.requires_grad)

    def optimizer_parameter_groups(self) -> list[Any]:
        """The optimizer's ``params``: every trainable parameter, or parameter groups (dicts with their own
        ``lr``, e.g. U2PL's 10x head learning rate) when a method overrides this."""
        return list(self.trainable_parameters())

    @property
    def num_params(self) -> int:
        return count_trainable_parameters(self.inference_network)

    @property
    def num_params_train(self) -> int:
        return sum(p.numel() for p in self.trainable_parameters())

    # ---- the shared training loop ---------------------------------------------------------------
    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.predict_logits(image)

    def training_losses(self, labeled: Batch, unlabeled: Batch | None) -> tuple[torch.Tensor, LossTerms]:
        """Total loss and named terms: the supervised loss plus, with unlabeled data, the method's."""
        supervised, terms = self.supervised_loss(labeled)
        terms = {"loss_sup": supervised, **terms}
        total = supervised
        if unlabeled is not None and self.uses_unlabeled:
            unsupervised, unsupervised_terms = self.unsupervised_loss(unlabeled, labeled)
            total = total + unsupervised
            terms = {**terms, "loss_unsup": unsupervised, **unsupervised_terms}
        return total, terms

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor | None:
        loss, terms = self.training_losses(batch["labeled"], batch.get("unlabeled"))
        batch_size = batch["labeled"]["image"].shape[0]
        if not bool(torch.isfinite(loss.detach()).all()):  # one host sync per step; the loss is a scalar
            return self.handle_nonfinite_loss(loss, terms, batch_size)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        for name, value in terms.items():
            value = value.detach() if torch.is_tensor(value) else torch.tensor(float(value))
            self.log(f"train/{name}", value.float(), batch_size=batch_size)
        return loss

    def handle_nonfinite_loss(self, loss: torch.Tensor, terms: LossTerms, batch_size: int) -> None:
        """A NaN/Inf loss: stop with a debug checkpoint (``on_nonfinite: stop``) or skip the update."""
        culprits = [name for name, value in terms.items() if torch.is_tensor(value) and not torch.isfinite(value).all()]
        # the most specific term: a named part of the unsupervised loss before its sum, else the first one
        specific = [name for name in culprits if name not in ("loss_unsup",)]
        term = f"train/{(specific or culprits or ['loss'])[0]}"
        value = float(terms.get(term.removeprefix("train/"), loss).detach().float().mean())
        if self.on_nonfinite == "skip":
            self.skipped_batches += 1
            self.log("train/skipped_batches", float(self.skipped_batches), batch_size=batch_size)
            if self.max_skipped is None or self.skipped_batches <= int(self.max_skipped):
                return None
        path = self.save_debug_checkpoint()
        raise NonFiniteLossError(
            f"loss term '{term}' is {value} at step {self.global_step} (method {self.method_name}); "
            f"debug checkpoint: {path}. Lower optimizer.lr, enable trainer.gradient_clip_val, check the data, "
            "or set numerics.on_nonfinite=skip to skip such batches"
        )

    def save_debug_checkpoint(self) -> str:
        """Save the state at the faulty step as ``debug-nonfinite-step<k>.ckpt`` beside the run's checkpoints."""
        trainer = self.trainer
        callback = trainer.checkpoint_callback
        folder = Path(getattr(callback, "dirpath", None) or trainer.default_root_dir)
        path = folder / f"debug-nonfinite-step{self.global_step}.ckpt"
        trainer.save_checkpoint(path)
        return str(path)

    def _evaluate(self, batch: Batch, metrics: SegmentationMetrics, stage: str) -> torch.Tensor:
        logits = self.predict_logits(batch["image"])
        metrics.update(logits, batch["mask"])
        loss = self.seg_loss(logits, batch["mask"])
        self.log(f"{stage}/loss", loss, batch_size=batch["image"].shape[0], sync_dist=True)
        return logits

    def validation_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        return self._evaluate(batch, self.val_metrics, "val")

    def test_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        return self._evaluate(batch, self.test_metrics, "test")

    def _log_metrics(self, metrics: SegmentationMetrics, stage: str) -> None:
        values = metrics.compute()
        # torchmetrics already reduced the states over ranks; sync_dist keeps Lightning's epoch-level logging consistent
        self.log_dict({f"{stage}/{key}": value for key, value in values.items()}, sync_dist=True)
        metrics.reset()

    def on_validation_epoch_end(self) -> None:
        self._log_metrics(self.val_metrics, "val")

    def on_test_epoch_end(self) -> None:
        self._log_metrics(self.test_metrics, "test")

    # ---- checkpoints ------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Make checkpoints self-describing: ``python -m semiseg.evaluate`` rebuilds the method from them."""
        checkpoint["semiseg"] = {
            "method_class": f"{type(self).__module__}.{type(self).__qualname__}",
            "method": self.method_name,
            "model": self.model_name,
            "class_names": list(self.class_names),
        }

    # ---- optimisation ---------------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        optimizer = _factory(self.optimizer_config)(params=self.optimizer_parameter_groups())
        if not self.scheduler_config:
            return optimizer
        scheduler_config = dict(self.scheduler_config)
        factory = scheduler_config.pop("scheduler", None)
        if factory is None:
            raise ConfigError("scheduler needs a 'scheduler' entry (a partial config with _target_)")
        if self.trainer is not None and self.trainer.max_steps and self.trainer.max_steps > 0:
            factory = _fill_total_steps(factory, self.trainer.max_steps)
        elif self.trainer is not None and math.isfinite(self.trainer.estimated_stepping_batches):
            factory = _fill_total_steps(factory, int(self.trainer.estimated_stepping_batches))  # budget in epochs
        scheduler_config["scheduler"] = _factory(factory)(optimizer=optimizer)
        return {"optimizer": optimizer, "lr_scheduler": scheduler_config}


def _factory(config: Mapping[str, Any]) -> Any:
    """A config with ``_target_`` -> a callable taking the remaining arguments (partial or class)."""
    config = dict(config)
    config.pop("_partial_", None)
    return instantiate({**config, "_partial_": True})


def _fill_total_steps(factory: dict, max_steps: int) -> dict:
    """Schedulers that need the run's length (``total_iters: auto``) get ``trainer.max_steps``."""
    factory = dict(factory)
    for key in ("total_iters", "total_steps", "T_max"):
        if factory.get(key) == "auto":
            factory[key] = max_steps
    return factory
