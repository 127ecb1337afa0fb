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

from collections.abc import Iterator, Mapping, Sequence
from typing import Any, ClassVar

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from semiseg.errors import ConfigError
from semiseg.losses import ce_dice_loss, class_weight_tensor
from semiseg.metrics import SegmentationMetrics
from semiseg.models.base import SegmentationNetwork, count_trainable_parameters
from semiseg.ramps import sigmoid_rampup

Batch = dict[str, Any]
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
        name: str | None = None,
        **method_options: Any,
    ) -> None:
        super().__init__()
        if method_options:
            raise ConfigError(
                f"method '{name or type(self).__name__}' has no option(s) {sorted(method_options)}; "
                "check the spelling of method.<key> overrides"
            )
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

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        loss, terms = self.training_losses(batch["labeled"], batch.get("unlabeled"))
        batch_size = batch["labeled"]["image"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        for name, value in terms.items():
            value = value.detach() if torch.is_tensor(value) else torch.tensor(float(value))
            self.log(f"train/{name}", value.float(), batch_size=batch_size)
        return loss

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

    # ---- optimisation ---------------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        optimizer = _factory(self.optimizer_config)(params=list(self.trainable_parameters()))
        if not self.scheduler_config:
            return optimizer
        scheduler_config = dict(self.scheduler_config)
        factory = scheduler_config.pop("scheduler", None)
        if factory is None:
            raise ConfigError("scheduler needs a 'scheduler' entry (a partial config with _target_)")
        if self.trainer is not None and self.trainer.max_steps and self.trainer.max_steps > 0:
            factory = _fill_total_steps(factory, self.trainer.max_steps)
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
