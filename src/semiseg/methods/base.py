"""The base LightningModule of every method.

:class:`SemiSupervisedModule` owns everything methods share: building networks from the ``model``
config, the supervised loss, the optimizer and scheduler, validation and test metrics, and logging.
A method subclass says only what is new:

* ``uses_unlabeled`` / ``unlabeled_views`` (class attributes): whether it consumes unlabeled batches
  and which views of each unlabeled image the DataModule must produce (:meth:`views_for` when they depend on
  the method's settings);
* :meth:`configure_networks`: the networks it trains (default: one network ``self.net``);
* :meth:`unsupervised_loss`: its loss on the unlabeled batch, and named terms to log;
* optionally :meth:`supervised_loss` (e.g. averaged over several decoders), :meth:`predict_logits`
  and :attr:`inference_network` (what runs at validation, test and deployment).

The training step is ``loss = supervised_loss(labeled) + unsupervised_loss(unlabeled)``; every term the
method returns is logged as ``train/<name>``.

Validation, test and prediction go through :meth:`SemiSupervisedModule.segment`: the inference network on the
batch as it is, or, with ``evaluation.sliding_window`` (models trained on ``data.crop_size`` crops), over
overlapping tiles of each whole image (:mod:`semiseg.inference`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from semiseg.errors import ConfigError, SemiSegError, check_choice
from semiseg.inference import SlidingWindow
from semiseg.losses import ce_dice_from_log_probabilities, class_weight_tensor
from semiseg.metrics import PerImageMetrics, SegmentationMetrics
from semiseg.models.base import SegmentationNetwork, count_trainable_parameters
from semiseg.ramps import sigmoid_rampup

log = logging.getLogger(__name__)

DIVERGENCE_FACTOR = 100.0  # numerics.divergence_factor's default: warn above 100 x the first training loss

Batch = dict[str, Any]
DEFAULT_OPTIMIZER = {"_target_": "torch.optim.Adam", "_partial_": True, "lr": 1e-3}
NONFINITE_POLICIES = ("stop", "skip")  # what a NaN/Inf training loss does (numerics.on_nonfinite)


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

    @classmethod
    def views_for(cls, method: Mapping[str, Any]) -> tuple[str, ...]:
        """The views of each unlabeled image the DataModule makes for a run with the ``method`` config (its
        keyword arguments); default :attr:`unlabeled_views`. A method whose views depend on a setting narrows them,
        so no augmentation is drawn for a view its loss never reads."""
        return cls.unlabeled_views

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
        # self.hparams: these arguments (and a subclass's), saved in every checkpoint; the properties below read them
        self.save_hyperparameters(logger=False)
        loss = dict(loss or {})
        self.ce_weight = float(loss.get("ce_weight", 0.5))
        self.dice_weight = float(loss.get("dice_weight", 0.5))
        weights = class_weight_tensor(loss.get("class_weights"), self.num_classes)
        self.register_buffer("class_weights", weights if weights is not None else torch.empty(0), persistent=False)
        evaluation = dict(evaluation or {})
        numerics = dict(numerics or {})
        self.on_nonfinite = check_choice(
            "numerics.on_nonfinite", str(numerics.get("on_nonfinite", "stop")), NONFINITE_POLICIES
        )
        self.max_skipped = numerics.get("max_skipped")
        self.skipped_batches = 0
        factor = numerics.get("divergence_factor", DIVERGENCE_FACTOR)
        self.divergence_factor = None if factor is None else float(factor)
        self._first_loss: float | None = None
        self._divergence_warned = False
        self.method_name = name or type(self).__name__.lower()
        metric_args = {
            "class_names": self.class_names,
            "ignore_index": ignore_index,
            "background_index": int(evaluation.get("background_index", 0)),
            "per_batch": bool(evaluation.get("per_batch_metrics", False)),
        }
        self.val_metrics = SegmentationMetrics(**metric_args)
        self.test_metrics = SegmentationMetrics(**metric_args)
        # the papers' per-image convention beside the whole-split metrics (keys <stage>/mIoU_image, mDice_image)
        image_args = {k: metric_args[k] for k in ("class_names", "ignore_index", "background_index")}
        self.image_metrics = nn.ModuleDict({stage: PerImageMetrics(**image_args) for stage in ("val", "test")})
        self.configure_networks()
        divisor = getattr(self.inference_network, "size_divisor", 1)
        self.sliding_window = SlidingWindow.from_config(evaluation, divisor)  # None: whole batches as they are

    # ---- the run's facts, from the saved hyperparameters ----------------------------------------
    @property
    def class_names(self) -> list[str]:
        """All class names of the dataset, background first."""
        return self.hparams["class_names"]

    @property
    def num_classes(self) -> int:
        return len(self.hparams["class_names"])

    @property
    def in_channels(self) -> int:
        return self.hparams["in_channels"]

    @property
    def ignore_index(self) -> int:
        """The target value of unlabeled pixels."""
        return self.hparams["ignore_index"]

    @property
    def model_name(self) -> str | None:
        return self.hparams["model"].get("name")

    @property
    def model_config(self) -> dict[str, Any]:
        """The network config without its ``name``: ``_target_`` and the network's arguments."""
        return {key: value for key, value in self.hparams["model"].items() if key != "name"}

    @property
    def optimizer_config(self) -> dict[str, Any]:
        """The partial optimizer config (Adam with lr 1e-3 when none was given)."""
        return self.hparams["optimizer"] or DEFAULT_OPTIMIZER

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

    def diagnostic_pseudo_labels(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The pseudo-labels this method's unsupervised loss would draw from ``image (B, C, H, W)`` and the pixels
        it would use: ``(labels (B, H, W) long, used (B, H, W) bool)``. A diagnostic only
        (:class:`semiseg.callbacks.PseudoLabelQuality`, in eval mode, so without the training-time dropout or
        noise); it never feeds a loss.

        Default: the argmax of the inference network, every pixel used — exact for methods whose unsupervised
        loss uses every pixel of one network's prediction (CPS: each network's argmax supervises the other; this
        is network 1's), the plain prediction for the others. Methods with a confidence threshold or another
        source of targets override it."""
        logits = self.predict_logits(image)
        return logits.argmax(dim=1), torch.ones_like(logits[:, 0], dtype=torch.bool)

    def segment(self, image: torch.Tensor) -> torch.Tensor:
        """Validation, test and prediction: ``image (B, C, H, W)`` at any size -> ``(B, num_classes, H, W)``
        logits (log-probabilities through the sliding window when ``evaluation.sliding_window`` is on)."""
        if self.sliding_window is None:
            return self.predict_logits(image)
        return self.sliding_window(self.predict_logits, image)

    # ---- helpers for methods ------------------------------------------------------------------
    def build_network(self, **overrides: Any) -> SegmentationNetwork:
        """A new network from the ``model`` config, with the dataset's channels and classes."""
        config = {**self.model_config, **overrides}
        return instantiate(config, in_channels=self.in_channels, num_classes=self.num_classes, _convert_="all")

    def seg_loss(self, logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """The supervised loss ``ce_weight * CE + dice_weight * Dice`` (0.5 each by default)."""
        return self.seg_loss_from_log_probabilities(logits.log_softmax(dim=1), target, weight)

    def seg_loss_from_log_probabilities(
        self,
        log_probabilities: torch.Tensor,
        target: torch.Tensor,
        weight: torch.Tensor | None = None,
        probabilities: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """:meth:`seg_loss` from a log-softmax ``(B, C, H, W)`` the caller computed once (and its ``exp``, if
        it has that too), so that CE, Dice and the caller's own terms share it."""
        return ce_dice_from_log_probabilities(
            log_probabilities,
            target,
            ignore_index=self.ignore_index,
            weight=weight,
            class_weights=self.class_weights if self.class_weights.numel() else None,
            ce_weight=self.ce_weight,
            dice_weight=self.dice_weight,
            probabilities=probabilities,
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
        value = float(loss.detach())  # one host sync per step; the loss is a scalar
        if not math.isfinite(value):
            return self.handle_nonfinite_loss(loss, terms, batch_size)
        self.warn_if_diverging(value)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        for name, value in terms.items():
            value = value.detach() if torch.is_tensor(value) else torch.tensor(float(value))
            self.log(f"train/{name}", value.float(), batch_size=batch_size)
        return loss

    def warn_if_diverging(self, value: float) -> None:
        """Warn once when the training loss grows ``numerics.divergence_factor`` times above its first value
        (a learning rate far too high: Adam at ``lr=1e6`` reaches 1e12), while it is still finite."""
        if self.divergence_factor is None or self._divergence_warned:
            return
        if self._first_loss is None:
            self._first_loss = value
        elif value > abs(self._first_loss) * self.divergence_factor:
            self._divergence_warned = True
            log.warning(
                "the training loss is diverging: %.4g at step %d, %.0f times its first value %.4g; lower "
                "optimizer.lr (now %s) or enable trainer.gradient_clip_val",
                value, self.global_step, value / max(abs(self._first_loss), 1e-12), self._first_loss,
                self.optimizer_config.get("lr"),
            )  # fmt: skip

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
        if self.on_nonfinite == "skip":  # skipping is on already: the budget of skipped batches is spent
            advice = f"{self.skipped_batches} batches were skipped, more than numerics.max_skipped={self.max_skipped}"
            advice += "; lower optimizer.lr, enable trainer.gradient_clip_val or check the data"
        else:
            advice = (
                "Lower optimizer.lr, enable trainer.gradient_clip_val, check the data, "
                "or set numerics.on_nonfinite=skip to skip such batches"
            )
        raise NonFiniteLossError(
            f"loss term '{term}' is {value} at step {self.global_step} (method {self.method_name}); "
            f"debug checkpoint: {path}. {advice}"
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
        logits = self.segment(batch["image"])
        metrics.update(logits, batch["mask"])
        self.image_metrics[stage].update(logits, batch["mask"])
        loss = self.seg_loss(logits, batch["mask"])
        self.log(f"{stage}/loss", loss, batch_size=batch["image"].shape[0], sync_dist=True)
        return logits

    def validation_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        return self._evaluate(batch, self.val_metrics, "val")

    def test_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        return self._evaluate(batch, self.test_metrics, "test")

    def predict_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        return self.segment(batch["image"])

    def _log_metrics(self, metrics: SegmentationMetrics, stage: str) -> None:
        values = {**metrics.compute(), **self.image_metrics[stage].compute()}
        self.image_metrics[stage].reset()
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
        if not self.hparams["scheduler"]:
            return optimizer
        scheduler_config = dict(self.hparams["scheduler"])
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
