"""The LightningModules of a self-training student.

A student is the suite's supervised module trained on the generation's training set (labeled ground truth
plus pseudo-labels, all in the ``labeled`` stream): the Inconsistency-Mask pixels reach it already blacked
out in the input and marked in the target, so the only new things here are

* ``im_handling: background`` (the official code's encoding: ``pred_mask[im > 0] = 0``): masked pixels are
  labelled background; ``class``: the network gets one extra output channel, the "IM" class, which masked
  pixels are trained towards (at validation, test and pseudo-labelling only the real classes are used);
* ``input_noise_std``: Gaussian noise added to training inputs (Noisy Student's input noise);
* ``init_weights``: start from a previous student's weights (the official Consistency Loss fine-tunes the best
  LDT model) instead of a fresh initialisation;
* :class:`ConsistencyStudent`: the Consistency Loss baseline, an MSE between the softmax predictions on two
  augmented views (same geometry) of every unlabeled image, added to the supervised loss (``joint``) or in
  alternating passes (``alternating``, the official code).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from hydra.utils import instantiate

from semiseg.errors import ConfigError, check_choice
from semiseg.methods.base import Batch, LossTerms, SemiSupervisedModule
from semiseg.models.base import SegmentationNetwork

IM_HANDLING = ("ignore", "background", "class")


class Student(SemiSupervisedModule):
    """A student of one generation (and the teacher of the next).

    Args:
        im_handling: ``ignore`` (masked pixels carry ``ignore_index`` and add nothing to the loss, the
            paper), ``background`` (they are labelled background, the official code) or ``class`` (an extra
            trained class).
        input_noise_std: standard deviation of Gaussian noise added to training inputs (0: none).
        init_weights: a ``state_dict`` file (a student's ``model.pt``) loaded when fitting starts; a resumed
            fit then restores its checkpoint over it.
        **base: the arguments of :class:`SemiSupervisedModule`.
    """

    uses_unlabeled: ClassVar[bool] = False  # pseudo-labeled images come in the labeled stream

    def __init__(
        self, im_handling: str = "ignore", input_noise_std: float = 0.0, init_weights: str | None = None, **base: Any
    ) -> None:
        check_choice("method.im_handling", im_handling, IM_HANDLING)
        if input_noise_std < 0:
            raise ConfigError(f"method.input_noise_std={input_noise_std} must be >= 0")
        if init_weights is not None and not Path(init_weights).is_file():
            raise ConfigError(f"method.init_weights={init_weights}: no such file; give a student's model.pt")
        self.im_handling = im_handling
        self.input_noise_std = float(input_noise_std)
        self.init_weights = init_weights
        super().__init__(**base)
        if im_handling == "class" and self.class_weights.numel():
            self.class_weights = torch.cat([self.class_weights, self.class_weights.new_ones(1)])

    def setup(self, stage: str) -> None:
        """Load ``init_weights`` before Lightning restores a resumed checkpoint (which then wins)."""
        super().setup(stage)
        if stage == "fit" and self.init_weights is not None:
            self.load_state_dict(torch.load(self.init_weights, map_location="cpu"))

    @property
    def im_class(self) -> int | None:
        """Target index of inconsistency-masked pixels when they form a class, else ``None``."""
        return self.num_classes if self.im_handling == "class" else None

    def build_network(self, **overrides: Any) -> SegmentationNetwork:
        outputs = self.num_classes + (1 if self.im_handling == "class" else 0)
        config = {**self.model_config, **overrides}
        return instantiate(config, in_channels=self.in_channels, num_classes=outputs, _convert_="all")

    def predict_logits(self, image: torch.Tensor) -> torch.Tensor:
        """``image (B, C, H, W)`` -> logits ``(B, num_classes, H, W)`` of the real classes."""
        return self.inference_network(image)[:, : self.num_classes]

    def noisy(self, image: torch.Tensor) -> torch.Tensor:
        if self.training and self.input_noise_std > 0:
            return image + self.input_noise_std * torch.randn_like(image)
        return image

    def supervised_loss(self, labeled: Batch) -> tuple[torch.Tensor, LossTerms]:
        """``labeled["image"] (B, C, H, W)`` (masked pixels already blanked), ``labeled["mask"] (B, H, W)``
        (masked pixels: ``ignore_index`` or the IM class)."""
        loss = self.seg_loss(self.net(self.noisy(labeled["image"])), labeled["mask"])
        terms: LossTerms = {}
        if "im" in labeled:
            terms["masked_share"] = labeled["im"].float().mean()
        return loss, terms


CONSISTENCY_SCHEDULES = ("joint", "alternating")
CONSISTENCY_VIEWS = ("weak_strong", "strong_strong")


class ConsistencyStudent(Student):
    """Student with the Consistency Loss: ``weight · MSE(softmax f(view 1), softmax f(view 2))`` on unlabeled
    images (two augmentations of one image with the same geometry).

    Args:
        consistency_weight: weight of the MSE term (0: a plain supervised student, no unlabeled forward pass).
        schedule: ``joint`` adds the MSE to the supervised loss every step; ``alternating`` (the official
            ``train_*_consistency_loss``) runs, in each cycle, one pass over the labeled batches with the
            supervised loss only, then one pass over the unlabeled batches with the MSE only (both counted in
            steps: ``ceil(labeled items / batch)`` then ``ceil(unlabeled images / batch)``).
        views: ``weak_strong`` (the weak view and a strong one) or ``strong_strong`` (two independent strong
            photometric augmentations of the same flip/rotation, as the official two ``data_augmentation_image``
            calls).
    """

    uses_unlabeled: ClassVar[bool] = True
    unlabeled_views: ClassVar[tuple[str, ...]] = ("image", "image_strong", "image_strong2")

    def __init__(
        self, consistency_weight: float = 1.0, schedule: str = "joint", views: str = "weak_strong", **options: Any
    ) -> None:
        check_choice("method.schedule", schedule, CONSISTENCY_SCHEDULES)
        check_choice("method.views", views, CONSISTENCY_VIEWS)
        self.consistency_weight = float(consistency_weight)
        self.schedule = schedule
        self.views = views
        self.cycle: tuple[int, int] | None = None  # (labeled steps, unlabeled steps) of one alternating cycle
        super().__init__(**options)

    @classmethod
    def views_for(cls, method: Mapping[str, Any]) -> tuple[str, ...]:
        """``weak_strong`` reads the weak view and one strong view; ``strong_strong`` two strong views (the weak
        ``image`` is kept: every unlabeled batch carries it)."""
        if method.get("views", "weak_strong") == "weak_strong":
            return ("image", "image_strong")
        return cls.unlabeled_views

    def setup(self, stage: str) -> None:
        super().setup(stage)
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if stage == "fit" and self.schedule == "alternating" and datamodule is not None:
            labeled = len(datamodule.training_set())  # the self-training DataModule: labeled + pseudo-labeled
            unlabeled = len(datamodule.parts["unlabeled"])
            self.cycle = (
                max(1, math.ceil(labeled / datamodule.batch_size_labeled)),
                max(1, math.ceil(unlabeled / datamodule.batch_size_unlabeled)),
            )

    def labeled_phase(self) -> bool:
        """In the alternating schedule: is the current step in a cycle's labeled pass?"""
        if self.cycle is None:
            return True
        return self.global_step % sum(self.cycle) < self.cycle[0]

    def training_losses(self, labeled: Batch, unlabeled: Batch | None) -> tuple[torch.Tensor, LossTerms]:
        if self.schedule == "joint" or unlabeled is None or self.consistency_weight == 0:
            return super().training_losses(labeled, unlabeled)
        if self.labeled_phase():
            supervised, terms = self.supervised_loss(labeled)
            return supervised, {"loss_sup": supervised, **terms, "consistency_phase": 0.0}
        unsupervised, terms = self.unsupervised_loss(unlabeled, labeled)
        return unsupervised, {"loss_unsup": unsupervised, **terms, "consistency_phase": 1.0}

    def unsupervised_loss(self, unlabeled: Batch, labeled: Batch) -> tuple[torch.Tensor, LossTerms]:
        if self.consistency_weight == 0:
            zero = unlabeled["image"].new_zeros(())
            return zero, {"loss_consistency": zero}
        first_view, second_view = ("image", "image_strong") if self.views == "weak_strong" else (
            "image_strong", "image_strong2")  # fmt: skip
        first = self.predict_logits(self.noisy(unlabeled[first_view])).softmax(dim=1)
        second = self.predict_logits(self.noisy(unlabeled[second_view])).softmax(dim=1)
        mse = F.mse_loss(first, second)
        return self.consistency_weight * mse, {"loss_consistency": mse}
