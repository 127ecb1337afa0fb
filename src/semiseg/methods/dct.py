"""Deep co-training (Qiao, Shen, Zhang, Wang, Yuille, "Deep Co-Training for Semi-Supervised Image
Recognition", ECCV 2018), per pixel for segmentation (as Peng et al., Pattern Recognition 2020, do).

Two networks ``p1``, ``p2`` with different initialisations, each supervised on the labeled images:

    L = L_sup(p1) + L_sup(p2) + λ_cot(t) L_cot + λ_dif(t) L_dif

* **Agreement** (co-training assumption), on unlabeled images ``S``: the Jensen–Shannon divergence
  ``L_cot = H((p1 + p2)/2) - (H(p1) + H(p2))/2`` per pixel, averaged.
* **View difference**, on labeled and unlabeled images ``D ∪ S``: each network must not be fooled by the
  other's adversarial examples, ``L_dif = H(p1(x), p2(g1(x))) + H(p2(x), p1(g2(x)))`` with ``H`` the
  cross-entropy and ``g_i(x) = x + ε sign(∇_x CE(p_i(x), y))`` the FGSM example against network ``i``. As
  the authors told the PyTorch re-implementation (AlanChou/Deep-Co-Training), ``y`` is the true mask on
  labeled images and the network's own argmax on unlabeled ones, ``ε = 0.02``, and no clamping.
* ``λ_cot = 10`` and ``λ_dif = 0.5`` (the paper's CIFAR-10 setting), both with a sigmoid ramp-up.

Segmentation-specific choices (not simplifications of the objective): every term is averaged over pixels;
``ε`` acts on normalised images (the paper's images are in ``[0, 1]``-like ranges too); the FGSM gradient is
taken from the training forward pass (the input requires grad), so the attack adds one input-gradient
backward per network and no extra forward. The adversarial examples are detached (as FGSM libraries return
them); the targets ``p_i(x)`` of ``L_dif`` are not (the paper's loss).

The UAPS comparison code's "DCT" is a different, single-network method (MSE between the prediction of a
``rot90``-rotated image and the rotated prediction); it is not reproduced here.
"""

from __future__ import annotations

from typing import Any

import torch

from semiseg.errors import ConfigError, check_choice
from semiseg.methods.base import Batch, LossTerms
from semiseg.methods.consistency import fgsm_direction, js_divergence, soft_cross_entropy
from semiseg.methods.two_networks import TWO_NETWORK_INFERENCE, TwoNetworkModule


class DCT(TwoNetworkModule):
    """Two-view deep co-training: Jensen–Shannon agreement + adversarial view difference.

    Args:
        cot_weight: λ_cot at the end of the ramp-up.
        dif_weight: λ_dif at the end of the ramp-up.
        rampup_steps: sigmoid ramp-up length of both weights, in optimisation steps (0: none).
        epsilon: the FGSM step ε, in the units of the normalised image.
        dif_on_labeled: also apply the view-difference loss to the labeled images (the paper: ``D ∪ S``).
        inference: ``first`` (network 1) or ``ensemble`` (mean softmax of both).
    """

    def __init__(
        self,
        cot_weight: float = 10.0,
        dif_weight: float = 0.5,
        rampup_steps: float = 0,
        epsilon: float = 0.02,
        dif_on_labeled: bool = True,
        inference: str = "first",
        **base: Any,
    ) -> None:
        if epsilon < 0:
            raise ConfigError(f"method.epsilon={epsilon} must be non-negative (the paper uses 0.02)")
        self.cot_weight = cot_weight
        self.dif_weight = dif_weight
        self.rampup_steps = rampup_steps
        self.epsilon = epsilon
        self.dif_on_labeled = dif_on_labeled
        self.inference = check_choice("method.inference", inference, TWO_NETWORK_INFERENCE)
        super().__init__(**base)

    def supervised_loss(self, labeled: Batch) -> tuple[torch.Tensor, LossTerms]:
        # the input requires grad so that the FGSM direction can reuse this forward pass
        self._labeled_input = labeled["image"].detach().requires_grad_(self.dif_on_labeled)
        self._labeled_logits = (self.net(self._labeled_input), self.net2(self._labeled_input))
        first = self.seg_loss(self._labeled_logits[0], labeled["mask"])
        second = self.seg_loss(self._labeled_logits[1], labeled["mask"])
        return first + second, {"loss_sup_net1": first, "loss_sup_net2": second}

    def view_difference_loss(
        self,
        inputs: list[torch.Tensor],
        logits1: list[torch.Tensor],
        logits2: list[torch.Tensor],
        targets1: list[torch.Tensor],
        targets2: list[torch.Tensor],
    ) -> torch.Tensor:
        """``mean H(p1(x), p2(g1(x))) + mean H(p2(x), p1(g2(x)))`` over the pixels of all ``inputs``.

        ``targets_i`` are what the FGSM example ``g_i`` moves network ``i`` away from (``(B, H, W)`` each).
        """
        with torch.enable_grad():
            direction1 = fgsm_direction(inputs, logits1, targets1, self.ignore_index)
            direction2 = fgsm_direction(inputs, logits2, targets2, self.ignore_index)
        adversarial1 = torch.cat([x.detach() + self.epsilon * d for x, d in zip(inputs, direction1, strict=True)])
        adversarial2 = torch.cat([x.detach() + self.epsilon * d for x, d in zip(inputs, direction2, strict=True)])
        probs1, probs2 = torch.cat(logits1).softmax(dim=1), torch.cat(logits2).softmax(dim=1)
        return (
            soft_cross_entropy(probs1, self.net2(adversarial1)).mean()
            + soft_cross_entropy(probs2, self.net(adversarial2)).mean()
        )

    def unsupervised_loss(self, unlabeled: Batch, labeled: Batch) -> tuple[torch.Tensor, LossTerms]:
        image = unlabeled["image"].detach().requires_grad_(True)
        logits1, logits2 = self.net(image), self.net2(image)
        loss_cot = js_divergence(logits1, logits2).mean()

        inputs, all_logits1, all_logits2 = [image], [logits1], [logits2]
        targets1, targets2 = [logits1.detach().argmax(1)], [logits2.detach().argmax(1)]
        if self.dif_on_labeled:
            inputs.append(self._labeled_input)
            all_logits1.append(self._labeled_logits[0])
            all_logits2.append(self._labeled_logits[1])
            targets1.append(labeled["mask"])
            targets2.append(labeled["mask"])
        loss_dif = self.view_difference_loss(inputs, all_logits1, all_logits2, targets1, targets2)

        ramp = self.rampup(self.rampup_steps)
        cot_weight, dif_weight = self.cot_weight * ramp, self.dif_weight * ramp
        return cot_weight * loss_cot + dif_weight * loss_dif, {
            "loss_cot": loss_cot,
            "loss_dif": loss_dif,
            "weight_cot": torch.tensor(cot_weight),
            "weight_dif": torch.tensor(dif_weight),
        }
