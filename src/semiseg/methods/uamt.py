"""Uncertainty-aware Mean Teacher (Yu, Wang, Li, Fu, Heng, "Uncertainty-aware Self-ensembling Model for
Semi-supervised 3D Left Atrium Segmentation", MICCAI 2019), on 2-D images.

A Mean Teacher (:mod:`semiseg.methods.mean_teacher`: EMA teacher, softmax-MSE consistency, sigmoid ramp-up,
the same BatchNorm handling) whose consistency counts only the pixels where the teacher is certain. The
teacher's uncertainty is the entropy of its mean softmax over ``T`` stochastic forward passes (``T = 8``;
each with fresh input noise and the teacher's dropout active):

    u = -sum_c mean_T(p_c) log mean_T(p_c),   L_u = sum(I(u < H) * d) / sum(I(u < H))

where ``d`` is the per-pixel softmax MSE and the threshold ``H`` ramps (sigmoid) from ``0.75 * ln C`` to
``ln C``, the entropy of a uniform prediction over the ``C`` classes. When no pixel passes, the loss is 0.

Differences from the official code (configurable; the paper is the default):

* The UA-MT code (binary) uses ``u_max = ln 2``; the UAPS comparison code keeps ``ln 2`` for its four
  classes. ``threshold_max: null`` means ``ln C``; a number (e.g. ``0.6931``) reproduces the code.
* The UA-MT code ramps the threshold over the whole training (``threshold_rampup_steps``); the UAPS code
  ties it to the consistency weight's ramp (set ``threshold_rampup_steps`` to ``rampup_steps``).
* The code divides the masked sum over pixels *and classes* by ``2 * sum(mask)`` (``sum(mask)`` counts
  pixels): written for two classes, where it is the mean over classes, but ``C/2`` times the class mean for
  ``C`` classes (3x for the six classes of Magnetic Tiles). The default ``class_reduction: mean`` keeps the
  two-class scale the weight 0.1 was tuned with; ``half_sum`` is the code's normalisation for any ``C``.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from semiseg.errors import ConfigError
from semiseg.methods.base import LossTerms
from semiseg.methods.consistency import mean_prediction_entropy
from semiseg.methods.mean_teacher import MeanTeacher


class UAMT(MeanTeacher):
    """Mean Teacher with an entropy-masked consistency.

    Args:
        num_passes: ``T``, the teacher's stochastic forward passes for the uncertainty.
        threshold_start: the threshold at step 0 as a share of ``threshold_max`` (0.75).
        threshold_max: the final threshold in nats; ``null`` = ``ln C``.
        threshold_rampup_steps: sigmoid ramp-up length of the threshold, in optimisation steps.
        **mean_teacher: the :class:`~semiseg.methods.mean_teacher.MeanTeacher` options.
    """

    def __init__(
        self,
        num_passes: int = 8,
        threshold_start: float = 0.75,
        threshold_max: float | None = None,
        threshold_rampup_steps: float = 0,
        **mean_teacher: Any,
    ) -> None:
        if not isinstance(num_passes, int) or num_passes < 1:
            raise ConfigError(f"method.num_passes={num_passes!r} must be a positive integer (the paper uses 8)")
        if not 0.0 <= threshold_start <= 1.0:
            raise ConfigError(f"method.threshold_start={threshold_start} must lie in [0, 1] (a share of the maximum)")
        if threshold_max is not None and threshold_max <= 0:
            raise ConfigError(f"method.threshold_max={threshold_max} must be positive, or null for ln(num_classes)")
        self.num_passes = num_passes
        self.threshold_start = threshold_start
        self.threshold_max = threshold_max
        self.threshold_rampup_steps = threshold_rampup_steps
        super().__init__(**mean_teacher)

    def threshold(self) -> float:
        """``(start + (1 - start) * rampup(t)) * max``, in nats (``max = ln C`` unless configured)."""
        maximum = math.log(self.num_classes) if self.threshold_max is None else self.threshold_max
        ramp = self.rampup(self.threshold_rampup_steps)
        return (self.threshold_start + (1.0 - self.threshold_start) * ramp) * maximum

    def uncertainty(self, image: torch.Tensor) -> torch.Tensor:
        """Entropy ``(B, H, W)`` of the teacher's mean softmax over ``num_passes`` noised passes."""
        samples = torch.stack([self.teacher_probs(image) for _ in range(self.num_passes)])
        return mean_prediction_entropy(samples)

    def consistency_mask(self, image: torch.Tensor) -> tuple[torch.Tensor | None, LossTerms]:
        uncertainty = self.uncertainty(image)
        threshold = self.threshold()
        mask = uncertainty < threshold
        return mask, {
            "uncertainty_threshold": torch.tensor(threshold),
            "certain_fraction": mask.float().mean(),
            "uncertainty_mean": uncertainty.mean(),
        }
