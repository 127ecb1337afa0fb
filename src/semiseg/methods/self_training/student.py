"""The LightningModules of a self-training student.

A student is the suite's supervised module trained on the generation's training set (labeled ground truth
plus pseudo-labels, all in the ``labeled`` stream): the Inconsistency-Mask pixels reach it already blacked
out in the input and marked in the target, so the only new things here are

* ``im_handling: background`` (the official code's encoding: ``pred_mask[im > 0] = 0``): masked pixels are
  labelled background; ``class``: the network gets one extra output channel, the "IM" class, which masked
  pixels are trained towards (at validation, test and pseudo-labelling only the real classes are used);
* ``input_noise_std``: Gaussian noise added to training inputs (Noisy Student's input noise);
* :class:`ConsistencyStudent`: the Consistency Loss baseline, an MSE between the softmax predictions on two
  augmented views (weak and strong, same geometry) of every unlabeled image.
"""

from __future__ import annotations

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
        **base: the arguments of :class:`SemiSupervisedModule`.
    """

    uses_unlabeled: ClassVar[bool] = False  # pseudo-labeled images come in the labeled stream

    def __init__(self, im_handling: str = "ignore", input_noise_std: float = 0.0, **base: Any) -> None:
        check_choice("method.im_handling", im_handling, IM_HANDLING)
        if input_noise_std < 0:
            raise ConfigError(f"method.input_noise_std={input_noise_std} must be >= 0")
        self.im_handling = im_handling
        self.input_noise_std = float(input_noise_std)
        super().__init__(**base)
        if im_handling == "class" and self.class_weights.numel():
            self.class_weights = torch.cat([self.class_weights, self.class_weights.new_ones(1)])

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


class ConsistencyStudent(Student):
    """Student with the Consistency Loss: ``weight · MSE(softmax f(weak view), softmax f(strong view))`` on
    unlabeled images, added to the supervised loss on labeled (and pseudo-labeled) images.

    Args:
        consistency_weight: weight of the MSE term.
    """

    uses_unlabeled: ClassVar[bool] = True
    unlabeled_views: ClassVar[tuple[str, ...]] = ("image", "image_strong")

    def __init__(self, consistency_weight: float = 1.0, **options: Any) -> None:
        self.consistency_weight = float(consistency_weight)
        super().__init__(**options)

    def unsupervised_loss(self, unlabeled: Batch, labeled: Batch) -> tuple[torch.Tensor, LossTerms]:
        first = self.predict_logits(self.noisy(unlabeled["image"])).softmax(dim=1)
        second = self.predict_logits(self.noisy(unlabeled["image_strong"])).softmax(dim=1)
        mse = F.mse_loss(first, second)
        return self.consistency_weight * mse, {"loss_consistency": mse}
