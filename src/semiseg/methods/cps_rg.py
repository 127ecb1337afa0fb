"""Cross pseudo supervision with seeded region growing of partial labels (``method=cps_rg``).

For images whose masks are only partly labeled (points, strokes, shrunk regions; see
:mod:`semiseg.data.partial`), after the plaggy/Semi_supervised_seismic_segmentation approach, which joins
Deep Seeded Region Growing (Huang et al., CVPR 2018) and cross pseudo supervision (Chen et al., CVPR 2021).
Two networks of the same architecture (default ``model=unet32``: 5 levels, 32 base filters) with different
initialisations train in three stages, counted in epochs:

1. from epoch 0: each network is supervised on the labeled pixels only, with the softmax focal loss
   (``loss_type: focal``, ``focal_gamma`` = 3) or its confidence-aware variant (``loss_type: superloss``):
   SuperLoss (Castells et al., NeurIPS 2020) applied per pixel to the focal loss, ``(ℓ - τ) σ* + λ (log σ*)²``
   with the closed-form confidence ``σ*``;
2. from ``cps_start_epoch``: plus cross pseudo supervision on the unlabeled pixels (those of partially
   labeled images, and all pixels of unlabeled images when the split has any): each network learns the other's
   argmax with cross-entropy, weighted by ``weight`` (ramped up over ``cps_rampup_epochs``);
3. from ``grow_start_epoch``, every ``grow_every`` epochs: at the start of the epoch the labels grow
   (:func:`~semiseg.methods.region_growing.grow_regions` on the mean softmax of both networks, per-class
   ``neighbourhood`` and ``threshold``, repeated until nothing changes). Given labels are never overwritten.
   The grown labels live in the DataModule's label store: saved in checkpoints, written as paletted PNGs to
   ``label_dir/epoch_<e>/`` and summarised in ``label_dir/history.json``.

Every epoch the labeled share of pixels per class is logged (``train/labeled_share/<class>``) and, when the
partial labels were generated from full masks, the precision of the grown labels against those full masks
(``train/grown_precision/<class>``): a diagnostic, never used in training.

Where the reference code differs (the paper is a blog-style README; the code is the reference):

* its confidence-aware loss wraps cross-entropy with ``τ = log C`` and ``λ = 0.25``; here it wraps the focal
  loss as the issue asks (``superloss.base: focal``) — ``superloss.base: ce`` with ``superloss.tau: log_classes``
  is the code's variant; ``superloss.tau: ema`` uses a running mean of the loss (the SuperLoss paper's choice for
  losses without a natural scale);
* its focal loss is TensorFlow Addons' *sigmoid* focal loss (α = 0.25) on softmax outputs; here the softmax focal
  loss of Lin et al.;
* its CPS loss is the same loss as the supervised one; here cross-entropy as in CPS (``cps_loss: supervised``
  gives the code's variant);
* its label update keeps grown labels and grows from them (``growing.accumulate: true``); ``false`` regrows
  from the given labels every time, as DSRG does with its seeds;
* the code can refine the probabilities with a dense CRF (pydensecrf); that package is unmaintained (2018) and its
  fork pydensecrf2 ships only a source archive needing a C++ build (no wheel installs here), so CRF is left out.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from semiseg.callbacks import PALETTE
from semiseg.errors import ConfigError, check_choice
from semiseg.io import atomic_write_json
from semiseg.losses import cross_entropy, focal_loss, focal_loss_per_pixel, superloss
from semiseg.methods.base import Batch, LossTerms
from semiseg.methods.cps import CPS
from semiseg.methods.region_growing import grow_regions, per_class_values
from semiseg.ramps import sigmoid_rampup

log = logging.getLogger(__name__)

LOSS_TYPES = ("focal", "superloss")
SUPERLOSS_BASES = ("focal", "ce")
CPS_LOSSES = ("ce", "supervised")


class CPSRegionGrowing(CPS):
    """CPS with partial-label supervision and seeded region growing.

    Args:
        loss_type: ``focal`` or ``superloss`` (confidence-aware) supervised loss on labeled pixels.
        focal_gamma: γ of the focal loss.
        class_balance: exponent ``a`` of class weights ``(n / (C n_c))^a`` from the given labels' class counts
            ``n_c`` (0: none, 0.5: inverse square root, 1: inverse frequency), computed when training starts; it
            replaces ``loss.class_weights`` in the partial loss (the reference code's ``weight_loss`` option
            weights its classes too). Clicks label far fewer defect than background pixels.
        superloss: ``base`` (``focal`` or ``ce``), ``lam`` (λ), ``tau`` (``ema``, ``log_classes`` or a number)
            and ``momentum`` (of the ``ema`` running mean).
        weight: weight of the CPS loss after its ramp-up.
        cps_start_epoch: first epoch of stage 2 (CPS on unlabeled pixels).
        cps_rampup_epochs: sigmoid ramp-up of the CPS weight from ``cps_start_epoch`` (0: none).
        cps_loss: ``ce`` (CPS) or ``supervised`` (the supervised loss, as the reference code).
        grow_start_epoch: first epoch of stage 3 (label growing); not before ``cps_start_epoch``.
        grow_every: grow every this many epochs in stage 3.
        growing: ``neighbourhood`` and ``threshold`` (a number, one per class, or ``{class: value, default:
            value}``), ``grow_background`` (whether background grows), ``accumulate``, ``max_rounds``.
        write_labels: write the labels as PNGs each time they grow (and the given ones at the start).
        label_dir: where the label PNGs and ``history.json`` go.
        inference: ``first`` or ``ensemble`` (mean softmax of both networks, as the reference code predicts).
    """

    def __init__(
        self,
        loss_type: str = "focal",
        focal_gamma: float = 3.0,
        class_balance: float = 0.5,
        superloss: dict | None = None,
        weight: float = 1.0,
        cps_start_epoch: int = 3,
        cps_rampup_epochs: int = 0,
        cps_loss: str = "ce",
        grow_start_epoch: int = 6,
        grow_every: int = 1,
        growing: dict | None = None,
        write_labels: bool = True,
        label_dir: str | None = None,
        inference: str = "ensemble",
        **base: Any,
    ) -> None:
        check_choice("method.loss_type", loss_type, LOSS_TYPES)
        check_choice("method.cps_loss", cps_loss, CPS_LOSSES)
        if not 0 <= cps_start_epoch <= grow_start_epoch:
            raise ConfigError(
                f"method.cps_start_epoch={cps_start_epoch} and method.grow_start_epoch={grow_start_epoch}: the "
                "stages run in order, so 0 <= cps_start_epoch <= grow_start_epoch"
            )
        if grow_every < 1:
            raise ConfigError(f"method.grow_every={grow_every} must be at least 1")
        superloss = dict(superloss or {})
        self.superloss_base = superloss.pop("base", "focal")
        self.superloss_lam = float(superloss.pop("lam", 0.25))
        self.superloss_tau = superloss.pop("tau", "ema")
        self.superloss_momentum = float(superloss.pop("momentum", 0.9))
        if superloss:
            raise ConfigError(f"method.superloss has no key(s) {sorted(superloss)}; use base, lam, tau, momentum")
        check_choice("method.superloss.base", self.superloss_base, SUPERLOSS_BASES)
        if not isinstance(self.superloss_tau, int | float) and self.superloss_tau not in ("ema", "log_classes"):
            raise ConfigError(f"method.superloss.tau={self.superloss_tau!r} must be 'ema', 'log_classes' or a number")
        if class_balance < 0:
            raise ConfigError(f"method.class_balance={class_balance} must be non-negative")
        self.class_balance = float(class_balance)
        self.loss_type = loss_type
        self.focal_gamma = float(focal_gamma)
        self.cps_start_epoch = int(cps_start_epoch)
        self.cps_rampup_epochs = int(cps_rampup_epochs)
        self.cps_loss = cps_loss
        self.grow_start_epoch = int(grow_start_epoch)
        self.grow_every = int(grow_every)
        self.write_labels = write_labels
        self.label_dir = Path(label_dir) if label_dir else None
        super().__init__(weight=weight, rampup_steps=0, cps_on_labeled=False, inference=inference, **base)
        growing = dict(growing or {})
        self.neighbourhood = per_class_values(
            growing.pop("neighbourhood", 20), self.class_names, "method.growing.neighbourhood", int
        )
        self.threshold = per_class_values(growing.pop("threshold", 0.8), self.class_names, "method.growing.threshold")
        self.grow_background = bool(growing.pop("grow_background", True))
        self.accumulate = bool(growing.pop("accumulate", True))
        self.max_rounds = int(growing.pop("max_rounds", 1000))
        if growing:
            raise ConfigError(
                f"method.growing has no key(s) {sorted(growing)}; use neighbourhood, threshold, grow_background, "
                "accumulate, max_rounds"
            )
        # running mean of the per-pixel loss: SuperLoss's τ when superloss.tau is 'ema' (NaN: not yet seen)
        self.register_buffer("loss_ema", torch.tensor(float("nan")))
        self.register_buffer("balance_weights", torch.empty(0), persistent=False)

    # ---- stages ---------------------------------------------------------------------------------------
    @property
    def stage(self) -> int:
        """1 (supervised), 2 (+ CPS) or 3 (+ label growing), from the current epoch."""
        epoch = self.current_epoch
        return 3 if epoch >= self.grow_start_epoch else 2 if epoch >= self.cps_start_epoch else 1

    @property
    def label_store(self) -> Any:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        return getattr(datamodule, "label_store", None)

    def setup(self, stage: str) -> None:
        if stage != "fit":
            return
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None or not hasattr(datamodule, "enable_label_store"):
            raise ConfigError(
                "method=cps_rg keeps its grown labels in semiseg's SemiSupervisedDataModule; train with it"
            )
        datamodule.enable_label_store()

    def compute_class_balance(self) -> None:
        """Class weights ``(n / (C n_c))^a`` from the given labels (classes without labels get weight 1)."""
        store = self.label_store
        if not self.class_balance or store is None:
            return
        store.fill()
        given = store.given[store.given != self.ignore_index].long()
        counts = torch.bincount(given, minlength=self.num_classes)[: self.num_classes].double()
        present = counts > 0
        weights = torch.ones(self.num_classes, dtype=torch.float64)
        weights[present] = (counts[present].sum() / (present.sum() * counts[present])) ** self.class_balance
        self.balance_weights = weights.float().to(self.device)
        log.info("cps_rg class weights %s", dict(zip(self.class_names, [round(w, 3) for w in weights.tolist()])))

    def on_train_start(self) -> None:
        self.compute_class_balance()
        trainer = self.trainer
        steps_per_epoch = trainer.num_training_batches
        if trainer.fast_dev_run or not steps_per_epoch or math.isinf(steps_per_epoch):
            return
        epochs = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else None
        if trainer.max_steps and trainer.max_steps > 0:
            by_steps = math.ceil(trainer.max_steps / steps_per_epoch)
            epochs = min(epochs, by_steps) if epochs else by_steps
        if epochs is not None:
            log.info(
                "cps_rg: about %d epochs of %d steps; stage 2 from epoch %d, stage 3 from epoch %d",
                epochs,
                steps_per_epoch,
                self.cps_start_epoch,
                self.grow_start_epoch,
            )
            if self.grow_start_epoch >= epochs:
                log.warning(
                    "cps_rg: method.grow_start_epoch=%d is never reached in this run of about %d epochs; lower it "
                    "(and method.cps_start_epoch) or raise trainer.max_steps",
                    self.grow_start_epoch,
                    epochs,
                )

    # ---- losses ---------------------------------------------------------------------------------------
    def partial_loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The supervised loss on the labeled pixels of ``target (B, H, W)`` (focal or confidence-aware focal)."""
        weights = self.balance_weights if self.balance_weights.numel() else None
        if weights is None and self.class_weights.numel():
            weights = self.class_weights
        if self.loss_type == "focal":
            return focal_loss(logits, target, self.focal_gamma, self.ignore_index, weights)
        gamma = self.focal_gamma if self.superloss_base == "focal" else 0.0
        per_pixel = focal_loss_per_pixel(logits, target, gamma, self.ignore_index, weights)
        valid = target != self.ignore_index
        count = valid.sum()
        tau = self._superloss_tau(per_pixel, valid)
        robust = superloss(per_pixel, tau, self.superloss_lam) * valid.to(per_pixel.dtype)
        return robust.sum() / count.clamp_min(1)

    def _superloss_tau(self, per_pixel: torch.Tensor, valid: torch.Tensor) -> float | torch.Tensor:
        if self.superloss_tau == "log_classes":
            return math.log(self.num_classes)
        if self.superloss_tau != "ema":
            return float(self.superloss_tau)
        if valid.any() and self.training:
            batch_mean = per_pixel.detach()[valid].mean()
            if torch.isnan(self.loss_ema):
                self.loss_ema.copy_(batch_mean)
            else:
                self.loss_ema.mul_(self.superloss_momentum).add_((1 - self.superloss_momentum) * batch_mean)
        return self.loss_ema if not torch.isnan(self.loss_ema) else math.log(self.num_classes)

    def supervised_loss(self, labeled: Batch) -> tuple[torch.Tensor, LossTerms]:
        image, target = labeled["image"], labeled["mask"]
        self._labeled_logits = (self.net(image), self.net2(image))
        first = self.partial_loss(self._labeled_logits[0], target)
        second = self.partial_loss(self._labeled_logits[1], target)
        labeled_share = (target != self.ignore_index).float().mean()
        return first + second, {"loss_sup_net1": first, "loss_sup_net2": second, "batch_labeled_share": labeled_share}

    def _cps_term(self, logits: torch.Tensor, pseudo: torch.Tensor) -> torch.Tensor:
        if self.cps_loss == "ce":
            return cross_entropy(logits, pseudo, self.ignore_index)
        return self.partial_loss(logits, pseudo)

    def unsupervised_loss(self, unlabeled: Batch | None, labeled: Batch) -> tuple[torch.Tensor, LossTerms]:
        """CPS on the unlabeled pixels of the labeled batch and on the whole unlabeled batch (from stage 2)."""
        logits1, logits2 = self._labeled_logits
        if self.stage < 2:
            return logits1.new_zeros(()), {"stage": torch.tensor(float(self.stage))}
        unlabeled_pixels = labeled["mask"] == self.ignore_index
        ignore = torch.full_like(labeled["mask"], self.ignore_index)
        all1, all2 = [logits1], [logits2]
        pseudo_for1 = [torch.where(unlabeled_pixels, logits2.detach().argmax(1), ignore)]
        pseudo_for2 = [torch.where(unlabeled_pixels, logits1.detach().argmax(1), ignore)]
        if unlabeled is not None:
            image = unlabeled["image"]
            u1, u2 = self.net(image), self.net2(image)
            all1.append(u1)
            all2.append(u2)
            pseudo_for1.append(u2.detach().argmax(1))
            pseudo_for2.append(u1.detach().argmax(1))
        loss_cps = self._cps_term(torch.cat(all1), torch.cat(pseudo_for1)) + self._cps_term(
            torch.cat(all2), torch.cat(pseudo_for2)
        )
        weight = self.weight * sigmoid_rampup(self.current_epoch - self.cps_start_epoch, self.cps_rampup_epochs)
        terms = {"loss_cps": loss_cps, "weight_cps": torch.tensor(weight), "stage": torch.tensor(float(self.stage))}
        return weight * loss_cps, terms

    def training_losses(self, labeled: Batch, unlabeled: Batch | None) -> tuple[torch.Tensor, LossTerms]:
        """Like the base, but the CPS term also runs without an unlabeled batch (partially labeled images
        have unlabeled pixels of their own)."""
        supervised, terms = self.supervised_loss(labeled)
        unsupervised, unsupervised_terms = self.unsupervised_loss(unlabeled, labeled)
        return supervised + unsupervised, {
            "loss_sup": supervised,
            **terms,
            "loss_unsup": unsupervised,
            **unsupervised_terms,
        }

    # ---- stage 3: growing the labels ------------------------------------------------------------------
    @torch.no_grad()
    def mean_probabilities(self, image: torch.Tensor) -> torch.Tensor:
        """``image (B, C, H, W)`` -> the two networks' mean softmax ``(B, num_classes, H, W)``."""
        return (self.net(image).softmax(1) + self.net2(image).softmax(1)) / 2

    @torch.no_grad()
    def grow_labels(self) -> dict[str, int]:
        """Grow the labels of every labeled image once (all rounds until nothing changes); update the store."""
        store = self.label_store
        loader = self.trainer.datamodule.label_store_dataloader()
        was_training = self.training
        self.eval()
        changed = rounds = 0
        grow_classes = [self.grow_background or c != 0 for c in range(self.num_classes)]
        try:
            for batch in loader:
                indices = batch["index"]
                probs = self.mean_probabilities(batch["image"].to(self.device)).float().cpu()
                seeds = (store.current if self.accumulate else store.given)[indices].long()
                grown, batch_rounds = grow_regions(
                    probs,
                    seeds,
                    self.neighbourhood,
                    self.threshold,
                    self.ignore_index,
                    self.max_rounds,
                    grow_classes,
                )
                changed += store.update(indices, grown)
                rounds = max(rounds, batch_rounds)
        finally:
            self.train(was_training)
        return {"changed": changed, "rounds": rounds}

    def on_train_epoch_start(self) -> None:
        store = self.label_store
        if store is None:
            return
        store.fill()
        epoch = self.current_epoch
        growth: dict[str, int] = {}
        due = epoch >= self.grow_start_epoch and (epoch - self.grow_start_epoch) % self.grow_every == 0
        if due and epoch not in store.grown_epochs:
            growth = self.grow_labels()
            store.grown_epochs.append(epoch)
            log.info("cps_rg epoch %d: grew %d pixels in %d rounds", epoch, growth["changed"], growth["rounds"])
        shares = store.labeled_share()
        precision = store.grown_precision()
        for name, value in shares.items():
            self.log(f"train/labeled_share/{name}", value, on_step=False, on_epoch=True)
        for name, value in precision.items():
            if value is not None:
                self.log(f"train/grown_precision/{name}", value, on_step=False, on_epoch=True)
        if all(entry["epoch"] != epoch for entry in store.history):
            store.history.append(
                {"epoch": epoch, "stage": self.stage, **growth, "labeled_share": shares, "grown_precision": precision}
            )
        if self.trainer.is_global_zero and self.label_dir is not None:
            atomic_write_json(self.label_dir / "history.json", store.history)
            if self.write_labels and (epoch == 0 or growth):
                self.write_label_pngs(store, self.label_dir / f"epoch_{epoch:03d}")

    def write_label_pngs(self, store: Any, folder: Path) -> None:
        """Every stored label map as a paletted PNG (pixel value = class index, ignored = 255, shown grey)."""
        folder.mkdir(parents=True, exist_ok=True)
        palette = np.zeros((256, 3), dtype=np.uint8)
        palette[: len(PALETTE)] = PALETTE
        palette[255] = 128
        for index, sample_id in enumerate(store.ids):
            labels = store.current[index].numpy().astype(np.uint8)
            picture = Image.fromarray(labels, mode="P")
            picture.putpalette(palette.flatten().tolist())
            picture.save(folder / f"{sample_id.replace('/', '__')}.png")
