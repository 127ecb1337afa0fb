"""UAPS: uncertainty-aware and dynamically-mixed pseudo-labels (Sime, Wang, Zeng, Peng, "Uncertainty-aware and
dynamically-mixed pseudo-labels for semi-supervised defect segmentation", Computers in Industry 152, 2023).

Network. One shared encoder, a main decoder on clean features and ``num_aux_decoders`` auxiliary decoders,
each fed the encoder features (every level) through its own perturbation: feature noise, dropout, feature
drop, cycling past three (:mod:`semiseg.models.perturbations`). ``K = 1 + num_aux_decoders`` decoders in all.

Losses, with ``p_k = softmax(decoder_k)`` of shape ``(B, C, H, W)`` on the unlabeled batch:

* ``L_sup``: mean over the K decoders of ``0.5 (CE + Dice)`` on the labeled batch (aux decoders perturbed);
* ``p̄ = mean_k p_k``; uncertainty per pixel ``u_k = KL(p̄ ‖ p_k) = Σ_c p̄_c (log p̄_c − log p_k,c)``, ``(B, H, W)``;
* pseudo-label ``ŷ = argmax_c Σ_k λ_k p_k`` (detached) with ``λ ~ Dirichlet(1, …, 1)`` drawn once per
  iteration ("dynamic mixing"); ``mixing: average`` uses ``λ_k = 1/K`` (the paper's ablation);
* ``L_ups = mean_k 0.5 (CE + Dice)(p_k, ŷ)`` with every pixel weighted by ``exp(−u_k / τ)``, ``τ =
  certainty_temperature`` (the paper: ``τ = 1``; an option of this suite, not of the paper or its code: late in
  training the decoders agree so closely that ``exp(−u)`` keeps about 98 % of a wrong pseudo-label's weight,
  experiments/evidence/README.md; ``τ < 1`` sharpens the weights the uncertainty already ranks);
* ``L_un = mean_k mean(u_k)``;
* ``L_ps`` (off by default; the paper's ablation ℓps): ``L_ups`` without the uncertainty weights.

``L = L_sup + w1(t) (L_ups + L_ps) + w2(t) L_un`` with ``w_i(t) = coefficient_i · exp(−5 (1 − min(t, T)/T)²)``.

Ramp unit. ``t = global_step // rampup_unit_steps`` (integer division, as the official code's
``iter_num // N``) and ``T = rampup_length`` such units; the paper's ``T = 200`` units of 80 iterations is
``rampup_length: 200, rampup_unit_steps: 80`` (16,000 optimisation steps to reach the full weight).

Paper and official code differ in three places; the paper is the default, the code's variant an option:

* the code multiplies a batch-mean ``0.5 (CE + Dice)`` by the mean of ``exp(−u_k)``:
  ``uncertainty_weighting: batch`` (default ``pixel``: the per-pixel weighting the paper writes);
* the code's Magnetic Tiles script adds ``L_un`` with weight 1 and no ramp: ``un_coefficient: 1.0,
  un_rampup: false`` (default: ``0.1`` and ramped, as the paper);
* the code back-propagates through the weights ``exp(−u_k)`` and through ``p̄`` (no detach), which is the
  default here too; ``detach_uncertainty_weights: true`` treats the weights as constants.

At validation, test and deployment only the encoder and the main decoder run (``inference: main``);
``inference: ensemble`` uses the mean softmax of all decoders (clean features in eval mode).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from semiseg.errors import ConfigError, check_choice
from semiseg.methods.base import Batch, LossTerms, SemiSupervisedModule, _plain
from semiseg.models.multi_decoder import MultiDecoderNetwork
from semiseg.models.perturbations import UAPS_ORDER, make_perturbation
from semiseg.ramps import sigmoid_rampup

MIXING_MODES = ("dynamic", "average")
WEIGHTING_MODES = ("pixel", "batch")
INFERENCE_MODES = ("main", "ensemble")
LOG_EPS = 1e-8  # floor of probabilities before a log (KL divergence, ensemble log-probabilities)


class DecoderEnsemble(nn.Module):
    """Mean softmax of every decoder, returned as log-probabilities (argmax-compatible logits)."""

    def __init__(self, network: MultiDecoderNetwork) -> None:
        super().__init__()
        self.network = network
        self.size_divisor = network.size_divisor

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """``image (B, C, H, W)`` -> ``log mean_k p_k`` of shape ``(B, num_classes, H, W)``."""
        return self.network.ensemble_probabilities(image).clamp_min(LOG_EPS).log()


def decoder_uncertainty(log_probabilities: torch.Tensor) -> torch.Tensor:
    """Per-pixel uncertainty of each decoder: ``u_k = KL(p̄ ‖ p_k)``, exact for confident decoders.

    Args:
        log_probabilities: ``(K, B, C, H, W)`` log-softmax of the K decoders.

    Returns:
        ``(K, B, H, W)``: ``Σ_c p̄_c (log p̄_c − log p_k,c)`` with ``p̄ = mean_k p_k``; zero where all agree.
        ``log p̄ = logsumexp_k log p_k − log K`` and ``log p_k`` come from the log-softmax, so no probability
        is floored before a log (a floor would cut the KL of a decoder that puts < 1e-8 on a class).
    """
    num_decoders = log_probabilities.shape[0]
    log_mean = torch.logsumexp(log_probabilities, dim=0, keepdim=True) - math.log(num_decoders)
    return (log_mean.exp() * (log_mean - log_probabilities)).sum(dim=2)


def mixing_weights(num_decoders: int, mode: str, device: torch.device | None = None) -> torch.Tensor:
    """λ of shape ``(K,)`` on the simplex: a ``Dirichlet(1, …, 1)`` draw (``dynamic``) or ``1/K`` (``average``)."""
    if check_choice("method.mixing", mode, MIXING_MODES) == "average":
        return torch.full((num_decoders,), 1.0 / num_decoders, device=device)
    concentration = torch.ones(num_decoders, device=device)  # dynamic
    return torch.distributions.Dirichlet(concentration).sample()


def mixed_pseudo_label(probabilities: torch.Tensor | Sequence[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """``ŷ = argmax_c Σ_k λ_k p_k`` (no gradient): K tensors ``(B, C, H, W)`` (or one ``(K, B, C, H, W)``) and
    ``λ (K,)`` -> ``(B, H, W)`` int64.

    Summed term by term, so the mix keeps the decoders' memory format: a stacked 5-d tensor is contiguous, and
    the argmax over the classes of a contiguous ``(B, C, H, W)`` map took about 3 times as long on the CPU as over
    a ``channels_last`` one (README, Performance). The sum runs in the order of ``k``, as a sum over a stack does.
    """
    mixed: torch.Tensor | None = None
    for weight, item in zip(weights, probabilities, strict=True):
        term = weight * item.detach()
        mixed = term if mixed is None else mixed + term
    if mixed is None:
        raise ValueError("mixed_pseudo_label needs at least one decoder's probabilities")
    return mixed.argmax(dim=1)


def disagreement_share(logits: Sequence[torch.Tensor]) -> torch.Tensor:
    """Share of pixels where the decoders' argmaxes are not all equal (a scalar in [0, 1])."""
    predictions = torch.stack([item.detach().argmax(dim=1) for item in logits])
    return (predictions != predictions[:1]).any(dim=0).float().mean()


class UAPS(SemiSupervisedModule):
    """Uncertainty-aware, dynamically-mixed pseudo-labels on a multi-decoder U-Net.

    Args:
        num_aux_decoders: auxiliary decoders (the paper: 3; its ablation 0–4).
        perturbations: perturbation names cycled over the aux decoders (``noise``, ``dropout``,
            ``feature_drop``, ``channel_dropout``, ``none``).
        perturbation_options: keyword arguments per perturbation name (e.g. ``noise: {uniform_range: 0.3}``).
        mixing: ``dynamic`` (λ ~ Dirichlet(1, …, 1) per iteration) or ``average`` (λ_k = 1/K).
        uncertainty_weighting: ``pixel`` (the paper) or ``batch`` (the official code).
        use_ups: add the uncertainty-aware pseudo-supervision ``L_ups`` (weight w1).
        use_un: add the uncertainty minimisation ``L_un`` (weight w2).
        use_ps: add the plain pseudo-supervision ``L_ps`` without uncertainty (weight w1; ablation only).
        ups_coefficient: w1 after the ramp-up (the paper: 0.1).
        un_coefficient: w2 after the ramp-up (the paper: 0.1).
        rampup_length: T, in ramp units (the paper: 200).
        rampup_unit_steps: optimisation steps per ramp unit (the paper: 80).
        un_rampup: ramp w2 as w1 (the paper); ``false`` keeps w2 constant (the official MTiles code).
        detach_uncertainty_weights: treat ``exp(−u_k)`` as constants in ``L_ups``.
        certainty_temperature: τ in the weights ``exp(−u_k / τ)`` (the paper: 1.0; > 0).
        inference: ``main`` (encoder + main decoder) or ``ensemble`` (mean softmax of all decoders).
    """

    def __init__(
        self,
        num_aux_decoders: int = 3,
        perturbations: Sequence[str] = UAPS_ORDER,
        perturbation_options: Mapping[str, Mapping[str, Any]] | None = None,
        mixing: str = "dynamic",
        uncertainty_weighting: str = "pixel",
        use_ups: bool = True,
        use_un: bool = True,
        use_ps: bool = False,
        ups_coefficient: float = 0.1,
        un_coefficient: float = 0.1,
        rampup_length: float = 200,
        rampup_unit_steps: int = 80,
        un_rampup: bool = True,
        detach_uncertainty_weights: bool = False,
        certainty_temperature: float = 1.0,
        inference: str = "main",
        **base: Any,
    ) -> None:
        if isinstance(num_aux_decoders, bool) or not isinstance(num_aux_decoders, int) or num_aux_decoders < 0:
            raise ConfigError(f"method.num_aux_decoders={num_aux_decoders!r} must be an integer >= 0, e.g. 3")
        if num_aux_decoders and not perturbations:
            raise ConfigError("method.perturbations is empty; give at least one name, e.g. [noise, dropout]")
        for key, value, allowed in (
            ("mixing", mixing, MIXING_MODES),
            ("uncertainty_weighting", uncertainty_weighting, WEIGHTING_MODES),
            ("inference", inference, INFERENCE_MODES),
        ):
            check_choice(f"method.{key}", value, allowed)
        if (
            isinstance(certainty_temperature, bool)
            or not isinstance(certainty_temperature, int | float)
            or not (certainty_temperature > 0)
        ):
            raise ConfigError(
                f"method.certainty_temperature={certainty_temperature!r} must be a number > 0 (1.0: the paper)"
            )
        if isinstance(rampup_unit_steps, bool) or not isinstance(rampup_unit_steps, int) or rampup_unit_steps < 1:
            raise ConfigError(f"method.rampup_unit_steps={rampup_unit_steps!r} must be an integer >= 1, e.g. 80")
        # plain containers (not OmegaConf nodes) in the saved hyperparameters, so checkpoints load with
        # torch.load(weights_only=True)
        perturbations = [str(name) for name in perturbations]
        perturbation_options = {
            str(name): dict(_plain(options)) for name, options in (_plain(perturbation_options) or {}).items()
        }
        base = {key: _plain(value) for key, value in base.items()}
        self.num_aux_decoders = num_aux_decoders
        self.perturbation_names = list(perturbations)
        self.perturbation_options = perturbation_options
        self.mixing = mixing
        self.uncertainty_weighting = uncertainty_weighting
        self.use_ups, self.use_un, self.use_ps = bool(use_ups), bool(use_un), bool(use_ps)
        self.ups_coefficient = float(ups_coefficient)
        self.un_coefficient = float(un_coefficient)
        self.rampup_length = float(rampup_length)
        self.rampup_unit_steps = rampup_unit_steps
        self.un_rampup = bool(un_rampup)
        self.detach_uncertainty_weights = bool(detach_uncertainty_weights)
        self.certainty_temperature = float(certainty_temperature)
        self.inference = inference
        super().__init__(**base)

    # ---- networks -------------------------------------------------------------------------------
    def configure_networks(self) -> None:
        perturbations = []
        for index in range(self.num_aux_decoders):
            name = self.perturbation_names[index % len(self.perturbation_names)]
            perturbations.append(make_perturbation(name, **self.perturbation_options.get(name, {})))
        self.net = MultiDecoderNetwork(self.build_network(), perturbations)

    @property
    def num_decoders(self) -> int:
        return self.net.num_decoders

    @property
    def inference_network(self) -> nn.Module:
        return self.net.network if self.inference == "main" else DecoderEnsemble(self.net)

    # ---- schedules ------------------------------------------------------------------------------
    def ramp(self) -> float:
        """``exp(−5 (1 − min(t, T)/T)²)`` with ``t = global_step // rampup_unit_steps`` and ``T = rampup_length``."""
        return sigmoid_rampup(self.global_step // self.rampup_unit_steps, self.rampup_length)

    def loss_weights(self) -> tuple[float, float]:
        """``(w1(t), w2(t))`` at the current step."""
        ramp = self.ramp()
        return self.ups_coefficient * ramp, self.un_coefficient * (ramp if self.un_rampup else 1.0)

    # ---- losses ---------------------------------------------------------------------------------
    def supervised_loss(self, labeled: Batch) -> tuple[torch.Tensor, LossTerms]:
        """Mean over decoders of ``0.5 (CE + Dice)``; each decoder's loss is logged as ``loss_sup_<k>``."""
        per_decoder = [self.seg_loss(logits, labeled["mask"]) for logits in self.net.forward_all(labeled["image"])]
        terms = {f"loss_sup_{self._decoder_name(k)}": loss for k, loss in enumerate(per_decoder)}
        return torch.stack(per_decoder).mean(), terms

    def pseudo_supervision(
        self,
        log_probabilities: Sequence[torch.Tensor],
        probabilities: Sequence[torch.Tensor],
        pseudo_label: torch.Tensor,
        certainty: Sequence[torch.Tensor] | None,
    ) -> torch.Tensor:
        """Mean over decoders of ``0.5 (CE + Dice)(logits_k, ŷ)``, weighted by ``certainty = exp(−u)`` if given.

        Args:
            log_probabilities: K tensors ``(B, C, H, W)``, the log-softmax of each decoder (shared with the
                uncertainty); a ``(K, B, C, H, W)`` tensor works too. Separate tensors are faster: the backward of
                indexing a stacked tensor fills a zero tensor of the whole stack for every index.
            probabilities: their ``exp``, alike.
            pseudo_label: ``(B, H, W)``.
            certainty: K tensors ``(B, H, W)`` (or ``(K, B, H, W)``), or ``None`` (plain pseudo-supervision ℓps).
        """
        weights: Sequence[torch.Tensor | None] = [None] * len(log_probabilities) if certainty is None else certainty
        losses = []
        for log_p, p, weight in zip(log_probabilities, probabilities, weights, strict=True):
            if weight is None:
                losses.append(self.seg_loss_from_log_probabilities(log_p, pseudo_label, probabilities=p))
            elif self.uncertainty_weighting == "pixel":
                losses.append(self.seg_loss_from_log_probabilities(log_p, pseudo_label, weight=weight, probabilities=p))
            else:  # batch: a batch-mean loss times the mean certainty (no per-pixel weighting)
                loss = self.seg_loss_from_log_probabilities(log_p, pseudo_label, probabilities=p)
                losses.append(loss * weight.mean())
        return torch.stack(losses).mean()

    def diagnostic_pseudo_labels(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The mixed pseudo-label of all decoders with equal weights (the expectation of the dynamic mix, so no
        random draw is taken), every pixel used (the uncertainty weights scale pixels, they drop none)."""
        probabilities = torch.stack([item.softmax(dim=1) for item in self.net.forward_all(image)])
        weights = torch.full((probabilities.shape[0],), 1.0 / probabilities.shape[0], device=probabilities.device)
        pseudo_label = mixed_pseudo_label(probabilities, weights)
        return pseudo_label, torch.ones_like(pseudo_label, dtype=torch.bool)

    def unsupervised_loss(self, unlabeled: Batch, labeled: Batch) -> tuple[torch.Tensor, LossTerms]:
        """``w1 (L_ups + L_ps) + w2 L_un`` on ``unlabeled["image"] (B, C, H, W)``; switched-off terms are exactly 0."""
        active = self.use_ups or self.use_un or self.use_ps
        with torch.set_grad_enabled(active and torch.is_grad_enabled()):
            logits = self.net.forward_all(unlabeled["image"])
            log_probabilities = [item.log_softmax(dim=1) for item in logits]  # K x (B, C, H, W)
            probabilities = [item.exp() for item in log_probabilities]
            uncertainty = decoder_uncertainty(torch.stack(log_probabilities))  # (K, B, H, W)
            weights = mixing_weights(len(logits), self.mixing, device=uncertainty.device)
            pseudo_label = mixed_pseudo_label(probabilities, weights)
            zero = uncertainty.new_zeros(())
            loss_un = uncertainty.mean(dim=(1, 2, 3)).mean() if self.use_un else zero
            loss_ups = zero
            if self.use_ups:
                certainty = torch.exp(-uncertainty / self.certainty_temperature)
                if self.detach_uncertainty_weights:
                    certainty = certainty.detach()
                loss_ups = self.pseudo_supervision(log_probabilities, probabilities, pseudo_label, certainty.unbind(0))
            loss_ps = (
                self.pseudo_supervision(log_probabilities, probabilities, pseudo_label, None) if self.use_ps else zero
            )
        w1, w2 = self.loss_weights()
        total = w1 * (loss_ups + loss_ps) + w2 * loss_un
        terms: LossTerms = {
            "loss_ups": loss_ups,
            "loss_ps": loss_ps,
            "loss_un": loss_un,
            "w1": torch.tensor(w1),
            "w2": torch.tensor(w2),
            "uncertainty_mean": uncertainty.detach().mean(),
            "disagreement": disagreement_share(logits),
        }
        for k, value in enumerate(weights):
            terms[f"lambda_{self._decoder_name(k)}"] = value
        return total, terms

    @staticmethod
    def _decoder_name(index: int) -> str:
        return "main" if index == 0 else f"aux{index}"
