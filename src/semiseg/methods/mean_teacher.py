"""Mean Teacher (Tarvainen & Valpola, "Mean teachers are better role models", NeurIPS 2017), in the
segmentation setting of Yu et al. (UA-MT, MICCAI 2019) and the SSL4MIS / UAPS comparison code.

The student ``self.net`` is trained; the teacher is an exponential moving average of it
(:class:`~semiseg.methods.ema.EMATeacher`) and never receives gradients. On unlabeled images the student's
softmax is pulled towards the teacher's softmax on a noised copy of the image:

    L_u = w(t) * mean_pixels MSE(softmax(f_student(x + eta)), softmax(f_teacher(x + eta')))

with Gaussian input noise ``eta = clamp(N(0, 0.1^2), -0.2, 0.2)`` and ``w(t) = consistency * exp(-5 (1 -
t/T)^2)`` (sigmoid ramp-up). After every optimisation step ``θ_teacher ← α θ_teacher + (1 − α) θ_student``
with ``α = min(1 − 1/(t + 1), ema_decay)`` (the "true average first" warm-up of both official codes).

**BatchNorm buffers.** The teacher runs in train mode (``teacher_mode: train``), as in both official
codes: its dropout is active and BatchNorm normalises with the statistics of the teacher's own batch, so
its running buffers do not change the training targets. They matter only when the teacher is evaluated
(``inference: teacher``); the default ``ema_buffers: own`` keeps them as the teacher's own forward passes
update them (the official codes average parameters only), so they describe activations of the teacher's
weights. ``ema_buffers: ema`` averages them like the parameters and ``copy`` copies the student's;
``teacher_mode: eval`` runs the teacher deterministically on its running statistics (pair it with ``ema``).

Paper and code differ in a few points; the paper is the default and the code's variant an option:

* ``noise_on: both`` — the paper perturbs student and teacher inputs independently; the UA-MT/SSL4MIS/UAPS
  code noises the teacher's input only (``noise_on: teacher``).
* ``class_reduction: mean`` — the squared distance averaged over classes, as every official code computes
  it and as the papers' weights (0.1 here) were tuned with; ``sum`` is the squared L2 norm of the formula.
* ``consistency_start_step: 0`` — the UAPS MT code switches the consistency off for its first 1000 steps.
* ``inference: student`` — the UA-MT/SSL4MIS/UAPS code evaluates the student; ``teacher`` evaluates the EMA
  network (what Tarvainen & Valpola report as their main result).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from semiseg.errors import check_choice
from semiseg.methods.base import Batch, LossTerms, SemiSupervisedModule
from semiseg.methods.consistency import (
    CLASS_REDUCTIONS,
    gaussian_input_noise,
    masked_mean,
    softmax_mse,
)
from semiseg.methods.ema import BUFFER_POLICIES, EMATeacher, ramped_ema_decay

NOISE_TARGETS = ("both", "teacher")
TEACHER_MODES = ("train", "eval")
INFERENCE_NETWORKS = ("student", "teacher")


class MeanTeacher(SemiSupervisedModule):
    """Student + EMA teacher with a softmax-MSE consistency on noised unlabeled images.

    Args:
        consistency: the consistency weight at the end of the ramp-up.
        rampup_steps: length of the sigmoid ramp-up of the weight, in optimisation steps (0: no ramp).
        consistency_start_step: no consistency loss before this step (0: from the start).
        ema_decay: α, the teacher's decay after the warm-up.
        ema_decay_warmup: use ``min(1 - 1/(t+1), ema_decay)`` (true average of the first steps).
        ema_buffers: BatchNorm buffer policy of the teacher: ``own``, ``ema`` or ``copy``.
        teacher_mode: ``train`` (dropout on, batch statistics) or ``eval`` when the teacher predicts.
        noise_std, noise_clip: Gaussian input noise ``clamp(N(0, std^2), -clip, clip)`` (std 0: none).
        noise_on: ``both`` (independent noise for student and teacher) or ``teacher`` only.
        class_reduction: ``mean`` or ``sum`` of the squared softmax difference over classes.
        inference: ``student`` or ``teacher`` at validation, test and deployment.
    """

    def __init__(
        self,
        consistency: float = 0.1,
        rampup_steps: float = 0,
        consistency_start_step: int = 0,
        ema_decay: float = 0.99,
        ema_decay_warmup: bool = True,
        ema_buffers: str = "own",
        teacher_mode: str = "train",
        noise_std: float = 0.1,
        noise_clip: float = 0.2,
        noise_on: str = "both",
        class_reduction: str = "mean",
        inference: str = "student",
        **base: Any,
    ) -> None:
        self.consistency = consistency
        self.rampup_steps = rampup_steps
        self.consistency_start_step = consistency_start_step
        self.ema_decay = ema_decay
        self.ema_decay_warmup = ema_decay_warmup
        self.ema_buffers = check_choice("method.ema_buffers", ema_buffers, BUFFER_POLICIES)
        self.teacher_mode = check_choice("method.teacher_mode", teacher_mode, TEACHER_MODES)
        self.noise_std = noise_std
        self.noise_clip = noise_clip
        self.noise_on = check_choice("method.noise_on", noise_on, NOISE_TARGETS)
        self.class_reduction = check_choice("method.class_reduction", class_reduction, CLASS_REDUCTIONS)
        self.inference = check_choice("method.inference", inference, INFERENCE_NETWORKS)
        super().__init__(**base)

    def configure_networks(self) -> None:
        self.net = self.build_network()
        self.teacher = EMATeacher(self.net, decay=self.ema_decay, buffers=self.ema_buffers)

    @property
    def inference_network(self) -> nn.Module:
        return self.net if self.inference == "student" else self.teacher.module

    @property
    def num_params(self) -> int:
        """The student's trainable parameters: the teacher has the same architecture (its copies are frozen)."""
        return sum(p.numel() for p in self.net.parameters() if p.requires_grad)

    # ---- pieces the UA-MT subclass reuses ----------------------------------------------------------
    def diagnostic_pseudo_labels(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher's argmax on the clean image, every pixel used (the consistency loss covers all pixels;
        UA-MT's uncertainty mask is not applied here)."""
        logits = self.teacher(image)
        return logits.argmax(dim=1), torch.ones_like(logits[:, 0], dtype=torch.bool)

    def noised(self, image: torch.Tensor) -> torch.Tensor:
        """``image (B, C, H, W)`` plus a fresh draw of the clipped Gaussian input noise."""
        return gaussian_input_noise(image, self.noise_std, self.noise_clip)

    def student_input(self, image: torch.Tensor) -> torch.Tensor:
        return self.noised(image) if self.noise_on == "both" else image

    def teacher_probs(self, image: torch.Tensor) -> torch.Tensor:
        """Teacher softmax ``(B, C, H, W)`` on a noised copy of ``image``, without gradients."""
        self.teacher.train(self.teacher_mode == "train")
        return self.teacher(self.noised(image)).softmax(dim=1)

    def consistency_weight(self) -> float:
        """``consistency * rampup(t)``, 0 before ``consistency_start_step``."""
        if self.global_step < self.consistency_start_step:
            return 0.0
        return self.consistency * self.rampup(self.rampup_steps)

    def consistency_mask(self, image: torch.Tensor) -> tuple[torch.Tensor | None, LossTerms]:
        """Which pixels the consistency counts (``(B, H, W)``) and terms to log; Mean Teacher: all of them."""
        return None, {}

    # ---- the method ------------------------------------------------------------------------------
    def unsupervised_loss(self, unlabeled: Batch, labeled: Batch) -> tuple[torch.Tensor, LossTerms]:
        image = unlabeled["image"]
        student_logits = self.net(self.student_input(image))
        target = self.teacher_probs(image)
        mask, terms = self.consistency_mask(image)
        loss_consistency = masked_mean(softmax_mse(student_logits, target, self.class_reduction), mask)
        weight = self.consistency_weight()
        return weight * loss_consistency, {
            "loss_consistency": loss_consistency,
            "weight_consistency": torch.tensor(weight),
            **terms,
        }

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Move the teacher after the optimiser step; ``global_step`` already counts that step."""
        step = max(self.global_step - 1, 0)
        decay = ramped_ema_decay(step, self.ema_decay) if self.ema_decay_warmup else self.ema_decay
        self.teacher.update(self.net, decay)
