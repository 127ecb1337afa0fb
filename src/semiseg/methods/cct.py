"""Cross-consistency training (Ouali, Hudelot, Tami, "Semi-Supervised Semantic Segmentation with
Cross-Consistency Training", CVPR 2020).

One shared encoder, a main decoder and ``K`` auxiliary decoders. The main decoder is trained on the labeled
images; on the unlabeled ones each auxiliary decoder sees the encoder's features through its own
perturbation and is pulled towards the main decoder's *detached* prediction:

    L_u = (1/K) Σ_k MSE(softmax(g_k(perturb_k(z))), softmax(g(z)).detach())

weighted by ``weight · rampup(t)``. The encoder learns from ``L_u`` through the auxiliary branches.

Choices and differences (see docs/methods/cct.md):

* Perturbations are the shared ones of :mod:`semiseg.models.perturbations` (feature noise, dropout, attention
  feature drop), applied to every encoder level because the U-Net decoder reads skip features; the paper
  perturbs the single encoder output of its PSPNet-style network and also uses VAT, guided cutout and
  context/object masking, which are not implemented here.
* ``num_aux_decoders`` cycles through ``perturbations``. The paper uses 6 decoders per perturbation type
  (and 2 for VAT/masking); the UAPS comparison code uses one per type (3), our default.
* The paper trains only the main decoder on labeled images (and uses an annealed-bootstrapped CE); we use the
  suite's shared 0.5·(CE + Dice). ``aux_supervised: true`` averages the supervised loss over all decoders
  instead, as the UAPS comparison code does.
* The paper's weight is ω_u = 30 ramped over the first 10% of training (``rampup_steps: 0.1``).
* The UAPS comparison code (``CCT/CCT_train.py``, ``CCT/CCT_unet.py``) drops features with ``p = 0.3``
  (``perturbation_options: {dropout: {p: 0.3}}``; the default 0.5 is the UAPS decoders') and does not detach
  the main decoder's softmax, so the consistency also trains the main decoder towards the auxiliary ones
  (``detach_target: false``). ``method=cct_code`` sets both with ``aux_supervised: true``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from semiseg.errors import ConfigError
from semiseg.methods.base import Batch, LossTerms, SemiSupervisedModule, _plain
from semiseg.methods.pseudo_labels import ramp_length
from semiseg.models.multi_decoder import MultiDecoderNetwork
from semiseg.models.perturbations import make_perturbation


class CCT(SemiSupervisedModule):
    """Cross-consistency training.

    Args:
        num_aux_decoders: K, the number of auxiliary decoders (>= 1).
        perturbations: perturbation names (``noise``, ``dropout``, ``feature_drop``, ``channel_dropout``,
            ``none``), assigned to the auxiliary decoders in turn.
        weight: ω_u, the unsupervised weight after the ramp-up.
        rampup_steps: sigmoid ramp-up length in steps, or a fraction of ``trainer.max_steps`` when in (0, 1).
        aux_supervised: also train the auxiliary decoders on labeled images (supervised loss averaged over
            all decoders, the UAPS comparison code) instead of the main decoder only (the paper).
        perturbation_options: keyword arguments per perturbation name, e.g. ``dropout: {p: 0.3}``.
        detach_target: stop the gradient through the main decoder's softmax (the paper); ``false`` is the
            UAPS comparison code's plain MSE between the two softmaxes.
    """

    def __init__(
        self,
        num_aux_decoders: int = 3,
        perturbations: Sequence[str] = ("noise", "dropout", "feature_drop"),
        weight: float = 30.0,
        rampup_steps: float = 0.1,
        aux_supervised: bool = False,
        perturbation_options: Mapping[str, Mapping[str, Any]] | None = None,
        detach_target: bool = True,
        **base: Any,
    ) -> None:
        if not isinstance(num_aux_decoders, int) or num_aux_decoders < 1:
            raise ConfigError(f"method.num_aux_decoders={num_aux_decoders!r} must be a positive integer")
        if not perturbations:
            raise ConfigError("method.perturbations is empty; name at least one, e.g. [noise, dropout, feature_drop]")
        self.num_aux_decoders = num_aux_decoders
        self.perturbation_names = [str(name) for name in perturbations]
        self.weight = weight
        self.rampup_steps = rampup_steps
        self.aux_supervised = aux_supervised
        self.perturbation_options = {
            str(name): dict(_plain(options)) for name, options in (_plain(perturbation_options) or {}).items()
        }
        self.detach_target = detach_target
        super().__init__(**base)

    def configure_networks(self) -> None:
        names = [self.perturbation_names[k % len(self.perturbation_names)] for k in range(self.num_aux_decoders)]
        perturbations = [make_perturbation(name, **self.perturbation_options.get(name, {})) for name in names]
        self.net = MultiDecoderNetwork(self.build_network(), perturbations)

    @property
    def inference_network(self) -> nn.Module:
        return self.net.network  # encoder + main decoder

    def supervised_loss(self, labeled: Batch) -> tuple[torch.Tensor, LossTerms]:
        if not self.aux_supervised:
            return self.seg_loss(self.net(labeled["image"]), labeled["mask"]), {}
        losses = [self.seg_loss(logits, labeled["mask"]) for logits in self.net.forward_all(labeled["image"])]
        return torch.stack(losses).mean(), {"loss_sup_main": losses[0]}

    @staticmethod
    def consistency_loss(
        main_logits: torch.Tensor, aux_logits: Sequence[torch.Tensor], detach_target: bool = True
    ) -> torch.Tensor:
        """Mean over auxiliary decoders of the MSE between their softmax and the main decoder's softmax
        (detached unless ``detach_target`` is false); every tensor ``(B, C, H, W)``."""
        target = (main_logits.detach() if detach_target else main_logits).softmax(dim=1)
        return torch.stack([F.mse_loss(logits.softmax(dim=1), target) for logits in aux_logits]).mean()

    def unsupervised_loss(self, unlabeled: Batch, labeled: Batch) -> tuple[torch.Tensor, LossTerms]:
        main_logits, *aux_logits = self.net.forward_all(unlabeled["image"])
        consistency = self.consistency_loss(main_logits, aux_logits, self.detach_target)
        max_steps = self.trainer.max_steps if self._trainer is not None else None
        weight = self.weight * self.rampup(ramp_length(self.rampup_steps, max_steps))
        return weight * consistency, {"loss_consistency": consistency, "weight_consistency": torch.tensor(weight)}
