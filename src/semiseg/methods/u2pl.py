"""U2PL: semi-supervised segmentation using unreliable pseudo-labels (Wang et al., "Semi-Supervised Semantic
Segmentation Using Unreliable Pseudo-Labels", CVPR 2022; official code github.com/Haochen-Wang409/U2PL).

Network. A segmentation network whose decoder exposes its features (DeepLabv3+ of segmentation-models-pytorch
by default: ``model=smp_deeplabv3plus``; ResNet-101 in the paper, ``resnet18`` by default here) plus a
representation head on the decoder features (conv3x3-BN-ReLU-dropout, twice, then conv1x1 to 256 channels).
A teacher follows the student by EMA with decay ``min(1 - 1/(t + 1), 0.99)``, ``t`` counting the
semi-supervised steps. Validation and test run the teacher (as the official code does; ``inference``).

One training step (``B_l`` labeled, ``B_u`` unlabeled images of size ``H x W``):

1. The teacher predicts the weak view of the unlabeled images (eval mode): pseudo-labels ``ŷ = argmax p``.
2. CutMix: with probability ``cutmix.prob`` (0.5) every unlabeled image gets a box of ``cutmix.area`` (half) of
   its area pasted from its batch neighbour; the pseudo-labels are mixed with the same boxes.
3. The student sees labeled and mixed images in one pass: logits ``(B, C, H, W)`` and representations
   ``(B, 256, H/4, W/4)``; the teacher sees the same images (train mode, as in the official code,
   ``teacher_train_mode``) and gives the probabilities whose entropy splits reliable from unreliable pixels.
4. Loss ``L = L_s + unsup_weight * L_u + contrastive_weight * L_c``:

   * ``L_s``: cross-entropy on the labeled images (``supervised_loss: ce``), or OHEM cross-entropy as in the
     paper's Cityscapes setting (``ohem``: pixels whose target probability exceeds ``thresh`` are dropped
     unless that keeps fewer than ``min_kept``), or the suite's shared ``0.5 (CE + Dice)`` (``shared``).
   * ``L_u``: cross-entropy on the mixed pseudo-labels, ignoring the ``α_t`` % of pixels with the highest
     teacher entropy, ``α_t = α_0 (1 - progress)``, ``α_0 = 20``; progress is ``epoch / epochs`` when the run
     is budgeted in epochs (as in the paper), else ``step / max_steps``. The sum over kept pixels is divided
     by all ``B_u H W`` pixels (the paper, ``pseudo_loss_normalization: all_pixels``); the official code
     multiplies the mean over kept pixels by ``B_u H W / kept`` instead (``official``).
   * ``L_c`` (InfoNCE over cosine similarities / ``temperature`` 0.5), computed at the representation's
     resolution. For each class ``c``: *anchors* are student features of reliable pixels of class ``c``
     whose teacher probability of ``c`` exceeds ``anchor_threshold`` (0.3) — labeled pixels by their label,
     unlabeled pixels by their pseudo-label among the ``α_t`` % lowest-entropy ones; the *positive* is the
     class prototype, the mean teacher feature over the anchor pixels (``prototype_pixels: anchors``; the
     official code averages over all reliable pixels of the class, ``reliable``); *negatives* come from the
     class's memory queue, fed with teacher features of (a) labeled pixels not of class ``c`` for which ``c``
     ranks among the teacher's top ``low_rank`` classes and (b) unreliable unlabeled pixels (the ``α_t`` %
     highest-entropy ones) for which ``c`` ranks in ``[low_rank, high_rank)`` (3 and 20). Queues hold 30k
     entries (50k for background; ``queue_size``/``background_queue_size``), are module buffers saved in
     checkpoints and are all-gathered under DDP (:mod:`semiseg.methods.memory_bank`). ``num_queries`` (256)
     anchors per class, each against the prototype and ``num_negatives`` (50) queue entries; ``L_c`` is the
     mean over classes that have anchors and a non-empty queue (the official code divides the sum by the
     classes present in the batch and returns 0 when at most one is: ``contrastive_normalization:
     present_classes``). Weight 0.1 as in the paper (the official
     configs leave it at 1.0: ``contrastive_weight=1.0``).

Binary (and three-class) datasets. Ranks run from 0 to ``C - 1``: with ``low_rank >= C`` no class can rank in
``[low_rank, high_rank)`` and the unlabeled negatives — hence usually ``L_c`` — vanish (the official code
silently returns 0; its authors advise ``low_rank: 1`` for two classes). Here ``low_rank`` is capped at
``C - 1`` (with a log message) and ``high_rank`` at ``C``: for two classes a pixel is an unlabeled negative of
the class the teacher does not predict, and a labeled negative of ``c`` when the teacher wrongly ranks ``c`` first.

Differences from the official code, on purpose:

* Anchors and prototypes are indexed by the true class. The official ``compute_contra_memobank_loss``
  collects anchor candidates and prototypes for every class but reads them with the index of the *present*
  classes (``seg_feat_low_entropy_list[i]`` / ``seg_proto[i]`` for ``i < len(valid_classes)``) while taking
  negatives from ``memobank[valid_classes[i]]``, so whenever a class is absent from the batch anchors and
  prototype of one class are contrasted with another class's negatives (reported as U2PL issue #111).
* Labeled negatives follow the paper (label ``!= c``, ``c`` among the top ``low_rank``). The official code
  also multiplies them by the pixel's own one-hot label of ``c``, which makes the labeled set always empty
  (U2PL issue #171), and restricts unlabeled negatives of ``c`` to pixels pseudo-labeled ``c``.
* One-hot labels are built per image (the official ``label_onehot`` scatters every image of the batch into
  the first one).
* No auxiliary head on layer 3 (weight 0.4 in the official configs; not in the paper's method section);
  the smp DeepLabv3+ decoder (separable convolutions, 48-d low-level projection) replaces the official one.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from semiseg.errors import ConfigError, check_choice
from semiseg.losses import cross_entropy
from semiseg.methods.base import Batch, LossTerms, SemiSupervisedModule, _plain
from semiseg.methods.consistency import entropy
from semiseg.methods.ema import EMATeacher, ramped_ema_decay
from semiseg.methods.memory_bank import ClassQueues
from semiseg.methods.mixing import mix, random_boxes, rolled
from semiseg.models.base import SegmentationNetwork

log = logging.getLogger(__name__)

ENTROPY_EPS = 1e-10
PSEUDO_LOSS_NORMALIZATIONS = ("all_pixels", "official")
DEFAULT_CUTMIX = {"prob": 0.5, "area": 0.5, "aspect": [0.5, 2.0], "per_sample": False}
DEFAULT_OHEM = {"thresh": 0.7, "min_kept": 100000}
CONTRASTIVE_NORMALIZATIONS = ("used_classes", "present_classes")


# ---- networks ------------------------------------------------------------------------------------
class RepresentationHead(nn.Sequential):
    """Decoder features ``(B, C_in, h, w)`` -> representations ``(B, dim, h, w)`` (U2PL's projection head)."""

    def __init__(self, in_channels: int, dim: int = 256, hidden: int = 256, dropout: float = 0.1) -> None:
        super().__init__(
            nn.Conv2d(in_channels, hidden, 3, padding=1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Dropout2d(dropout),
            nn.Conv2d(hidden, hidden, 3, padding=1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Dropout2d(dropout),
            nn.Conv2d(hidden, dim, 1),
        )


class U2PLNetwork(nn.Module):
    """A segmentation network plus a representation head on its decoder features.

    ``segmenter.decoder`` must offer ``features(encoder_features) -> (B, D, h, w)`` and ``head`` (features
    -> logits), as the smp wrappers' :class:`~semiseg.models.smp.DecoderWithHead` does.
    """

    def __init__(self, segmenter: SegmentationNetwork, dim: int = 256, dropout: float = 0.1) -> None:
        super().__init__()
        decoder = getattr(segmenter, "decoder", None)
        if not (hasattr(decoder, "features") and hasattr(decoder, "head")):
            raise ConfigError(
                f"method=u2pl needs a network whose decoder exposes its features; {type(segmenter).__name__} does "
                "not. Use model=smp_deeplabv3plus (the paper's DeepLabv3+) or another smp model (model=smp_unet)"
            )
        convs = [m for m in decoder.head.modules() if isinstance(m, nn.Conv2d)]
        if not convs:
            raise ConfigError(f"cannot find the feature width of {type(segmenter).__name__}'s segmentation head")
        self.segmenter = segmenter
        self.representation = RepresentationHead(convs[0].in_channels, dim=dim, dropout=dropout)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """``image (B, C, H, W)`` -> logits ``(B, num_classes, H, W)``."""
        return self.segmenter(image)

    def forward_with_representation(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``image (B, C, H, W)`` -> logits ``(B, num_classes, H, W)``, representations ``(B, dim, h, w)``."""
        features = self.segmenter.decoder.features(self.segmenter.encode(image))
        return self.segmenter.decoder.head(features), self.representation(features)


# ---- building blocks (pure functions, tested on their own) ----------------------------------------
def extreme_share_mask(values: torch.Tensor, valid: torch.Tensor, share: float, largest: bool = True) -> torch.Tensor:
    """Bool mask of exactly ``round(share * n_valid)`` valid pixels with the largest (or smallest) ``values``.

    ``values``, ``valid``: ``(B, H, W)``; ``share`` in [0, 1]. Ties are broken by position, so the count is
    exact whatever the values.
    """
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"share={share} must lie in [0, 1]")
    mask = torch.zeros_like(valid, dtype=torch.bool)
    flat_valid = valid.reshape(-1).nonzero().squeeze(1)
    count = round(share * flat_valid.numel())
    if count == 0:
        return mask
    chosen = values.reshape(-1)[flat_valid].topk(count, largest=largest).indices
    mask.view(-1)[flat_valid[chosen]] = True
    return mask


def cutmix_boxes(
    batch_size: int,
    height: int,
    width: int,
    prob: float = 0.5,
    area: float = 0.5,
    aspect: Sequence[float] = (0.5, 2.0),
    per_sample: bool = False,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """``(B, H, W)`` bool boxes of ``area`` of the image each. With ``per_sample=False`` (the official code) one
    draw decides for the whole batch whether every image gets a box; otherwise each image draws on its own."""
    if per_sample:
        return random_boxes(batch_size, height, width, prob, (area, area), aspect, device)
    if float(torch.rand(())) >= prob:
        return torch.zeros(batch_size, height, width, dtype=torch.bool, device=device)
    return random_boxes(batch_size, height, width, 1.0, (area, area), aspect, device)


def pseudo_label_loss(
    logits: torch.Tensor, target: torch.Tensor, keep: torch.Tensor, normalization: str = "all_pixels"
) -> torch.Tensor:
    """Cross-entropy of ``logits (B, C, H, W)`` on ``target (B, H, W)`` over the ``keep (B, H, W)`` pixels.

    ``all_pixels``: sum over kept pixels / all ``B H W`` pixels (the paper). ``official``: mean over kept
    pixels times ``B H W / kept`` (the official code's weighting).
    """
    check_choice("method.pseudo_loss_normalization", normalization, PSEUDO_LOSS_NORMALIZATIONS)
    per_pixel = F.cross_entropy(logits, target.clamp_min(0).clamp_max(logits.shape[1] - 1), reduction="none")
    kept = keep.to(per_pixel.dtype)
    total = kept.sum()
    if normalization == "all_pixels":
        return (per_pixel * kept).sum() / target.numel()
    mean = (per_pixel * kept).sum() / total.clamp_min(1.0)  # official
    return mean * target.numel() / total.clamp_min(1.0)


def ohem_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int = 255,
    thresh: float = 0.7,
    min_kept: int = 100000,
    class_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Online hard example mining CE: mean CE over valid pixels whose target-class probability is at most
    ``max(thresh, p_(min_kept))`` (the ``min_kept``-th smallest target probability); all valid pixels when
    there are no more than ``min_kept``. ``logits (B, C, H, W)``, ``target (B, H, W)``."""
    valid = target != ignore_index
    with torch.no_grad():
        safe = torch.where(valid, target, torch.zeros_like(target))
        target_prob = logits.softmax(1).gather(1, safe.unsqueeze(1)).squeeze(1)
        num_valid = int(valid.sum())
        keep = valid
        if 0 < min_kept < num_valid:
            kth = target_prob[valid].kthvalue(min_kept).values
            threshold = torch.maximum(kth, torch.tensor(thresh, dtype=kth.dtype, device=kth.device))
            keep = valid & (target_prob <= threshold)
    hard_target = torch.where(keep, target, torch.full_like(target, ignore_index))
    return cross_entropy(logits, hard_target, ignore_index, class_weights=class_weights)


def info_nce(
    anchors: torch.Tensor, positive: torch.Tensor, negatives: torch.Tensor, temperature: float
) -> torch.Tensor:
    """InfoNCE with cosine similarities: ``anchors (M, D)``, one ``positive (D,)`` or ``(M, D)``,
    ``negatives (M, N, D)`` -> mean over anchors of ``-log softmax([cos(a, p), cos(a, n_1..N)] / T)[0]``."""
    positive = positive.expand_as(anchors) if positive.ndim == 1 else positive
    keys = torch.cat([positive.unsqueeze(1), negatives], dim=1)  # (M, 1 + N, D)
    logits = F.cosine_similarity(anchors.unsqueeze(1), keys, dim=2) / temperature
    return F.cross_entropy(logits, torch.zeros(anchors.shape[0], dtype=torch.long, device=anchors.device))


@dataclass
class ContrastivePixels:
    """Per-class pixel masks at the representation's resolution, each ``(C, B, h, w)`` bool, and ``present``
    ``(C,)`` bool: the classes with a labeled or reliable unlabeled pixel (the official code's valid classes)."""

    anchors: torch.Tensor
    prototypes: torch.Tensor
    negatives: torch.Tensor
    present: torch.Tensor


def select_contrastive_pixels(
    labels: torch.Tensor,
    reliable: torch.Tensor,
    unreliable: torch.Tensor,
    probs: torch.Tensor,
    is_labeled: torch.Tensor,
    low_rank: int,
    high_rank: int,
    anchor_threshold: float,
    ignore_index: int = 255,
    prototype_pixels: str = "anchors",
) -> ContrastivePixels:
    """Anchor, prototype and negative pixels of every class (see the module docstring).

    Args:
        labels: ``(B, h, w)`` ground truth of labeled images, pseudo-labels of unlabeled ones.
        reliable / unreliable: ``(B, h, w)`` bool: candidate anchors / candidate unlabeled negatives
            (for labeled images: every labeled pixel).
        probs: ``(B, C, h, w)`` teacher probabilities.
        is_labeled: ``(B,)`` bool, which images carry ground truth.
        low_rank, high_rank: the rank window of negatives (``r_l``, ``r_h``).
        anchor_threshold: ``δ_p``, the minimum teacher probability of an anchor's class.
        prototype_pixels: ``anchors`` (the paper) or ``reliable`` (the official code).
    """
    num_classes = probs.shape[1]
    ranks = probs.argsort(dim=1, descending=True).argsort(dim=1)  # rank of each class at each pixel, 0 = top
    valid = labels != ignore_index
    labeled = is_labeled.view(-1, 1, 1)
    anchors, prototypes, negatives, present = [], [], [], []
    for c in range(num_classes):
        of_class = valid & (labels == c) & reliable
        anchor = of_class & (probs[:, c] > anchor_threshold)
        rank = ranks[:, c]
        labeled_negative = labeled & valid & (labels != c) & (rank < low_rank)
        unlabeled_negative = ~labeled & unreliable & (rank >= low_rank) & (rank < high_rank)
        anchors.append(anchor)
        prototypes.append(anchor if prototype_pixels == "anchors" else of_class)
        negatives.append(labeled_negative | unlabeled_negative)
        present.append(of_class.any())
    return ContrastivePixels(
        torch.stack(anchors), torch.stack(prototypes), torch.stack(negatives), torch.stack(present)
    )


def contrastive_loss(
    representation: torch.Tensor,
    teacher_representation: torch.Tensor,
    pixels: ContrastivePixels,
    queues: ClassQueues,
    num_queries: int,
    num_negatives: int,
    temperature: float,
    normalization: str = "used_classes",
) -> tuple[torch.Tensor, int]:
    """Enqueue every class's negatives, then the InfoNCE of the classes with anchors and negatives, averaged.

    ``representation`` (student, with gradient) and ``teacher_representation``: ``(B, D, h, w)``.
    ``normalization``: ``used_classes`` divides the sum by the classes that contributed; ``present_classes``
    (the official code) by the classes present in the batch (``pixels.present``), and gives 0 when at most one
    class is present. Returns the loss (a zero tied to the graph when no class qualifies) and the number of
    classes used.
    """
    with torch.autocast(device_type=representation.device.type, enabled=False):  # float32 similarities
        return _contrastive_loss(
            representation.float(),
            teacher_representation.float(),
            pixels,
            queues,
            num_queries,
            num_negatives,
            temperature,
            normalization,
        )


def _contrastive_loss(
    representation: torch.Tensor,
    teacher_representation: torch.Tensor,
    pixels: ContrastivePixels,
    queues: ClassQueues,
    num_queries: int,
    num_negatives: int,
    temperature: float,
    normalization: str,
) -> tuple[torch.Tensor, int]:
    student = representation.permute(0, 2, 3, 1)  # (B, h, w, D)
    teacher = teacher_representation.detach().permute(0, 2, 3, 1)
    for c in range(queues.num_classes):  # every class, every step: all ranks must take part in the gather
        queues.push(c, teacher[pixels.negatives[c]])
    losses = []
    for c in range(queues.num_classes):
        candidates = student[pixels.anchors[c]]
        if candidates.shape[0] == 0 or queues.size(c) == 0:
            continue
        chosen = torch.randint(candidates.shape[0], (num_queries,)).to(candidates.device)
        prototype = teacher[pixels.prototypes[c]].mean(dim=0)
        negatives = queues.sample(c, num_queries * num_negatives).to(student)
        negatives = negatives.view(num_queries, num_negatives, -1)
        losses.append(info_nce(candidates[chosen], prototype, negatives, temperature))
    num_present = int(pixels.present.sum())
    if not losses or (normalization == "present_classes" and num_present <= 1):
        return representation.sum() * 0.0, 0
    if normalization == "present_classes":
        return torch.stack(losses).sum() / num_present, len(losses)
    return torch.stack(losses).mean(), len(losses)


def _teacher_started_default(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    """Checkpoints written before ``teacher_started`` existed evaluated the teacher: keep that."""
    state_dict.setdefault(prefix + "teacher_started", torch.tensor(True))


def downsample_labels(labels: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Nearest-neighbour resize of ``(B, H, W)`` integer or bool maps to ``size``."""
    resized = F.interpolate(labels.unsqueeze(1).float(), size=tuple(size), mode="nearest").squeeze(1)
    return resized.to(labels.dtype)


@dataclass
class _JointPass:
    num_labeled: int
    logits: torch.Tensor  # student (B_l + B_u, C, H, W)
    representation: torch.Tensor  # student (B_l + B_u, D, h, w)
    teacher_logits: torch.Tensor  # teacher on the same images
    teacher_representation: torch.Tensor
    pseudo_labels: torch.Tensor  # mixed pseudo-labels (B_u, H, W)


# ---- the method ----------------------------------------------------------------------------------
class U2PL(SemiSupervisedModule):
    """U2PL (see the module docstring).

    Args:
        ema_decay: the teacher's final EMA decay (0.99), reached through ``min(1 - 1/(t + 1), ema_decay)``.
        ema_buffers: BatchNorm statistics of the teacher: ``own`` (its own train-mode passes; the official
            code), ``ema`` or ``copy`` (see :class:`~semiseg.methods.ema.EMATeacher`).
        teacher_train_mode: run the teacher's pass on labeled + mixed images in train mode (official code).
        unsup_weight: weight of the pseudo-label loss ``L_u``.
        alpha_0: initial share (%) of unreliable pixels, decayed linearly to 0 over training.
        pseudo_loss_normalization: ``all_pixels`` (paper) or ``official``.
        contrastive_weight: weight of ``L_c`` (paper 0.1; official configs 1.0); 0 switches it off.
        rep_dim, rep_dropout: representation head size and dropout.
        queue_size, background_queue_size: memory queue capacity per class, and for ``background_index``.
        queue_dtype: storage precision of the queues (``float16`` keeps checkpoints half as large).
        low_rank, high_rank: negatives' rank window (capped to the number of classes, see the docstring).
        anchor_threshold: ``δ_p``; num_queries, num_negatives, temperature: the InfoNCE sampling.
        prototype_pixels: ``anchors`` (paper) or ``reliable`` (official code).
        cutmix: ``prob``, ``area``, ``aspect`` range, ``per_sample``.
        supervised_loss: ``ce`` (paper), ``ohem`` (with ``ohem: {thresh, min_kept}``) or ``shared``.
        head_lr_multiplier: learning-rate factor of everything but the encoder (10 in the official VOC runs).
        supervised_only_steps: steps trained on labeled images alone before the teacher takes over; during
            them the teacher runs in train mode on the labeled images (warming its BatchNorm statistics, as the
            official code does) and validation uses the student.
        inference: ``teacher`` (official) or ``student`` network at validation and test.
        teacher_copy_steps: for this many semi-supervised steps the teacher is the student (copied before the
            pseudo-labels and after the update); the official code does so for its whole first
            semi-supervised epoch. 0: EMA from the first step.
        contrastive_normalization: ``used_classes`` or ``present_classes`` (the official code; see
            :func:`contrastive_loss`).
    """

    def __init__(
        self,
        ema_decay: float = 0.99,
        ema_buffers: str = "own",
        teacher_train_mode: bool = True,
        unsup_weight: float = 1.0,
        alpha_0: float = 20.0,
        pseudo_loss_normalization: str = "all_pixels",
        contrastive_weight: float = 0.1,
        rep_dim: int = 256,
        rep_dropout: float = 0.1,
        queue_size: int = 30000,
        background_queue_size: int = 50000,
        background_index: int = 0,
        queue_dtype: str = "float16",
        low_rank: int = 3,
        high_rank: int = 20,
        anchor_threshold: float = 0.3,
        num_queries: int = 256,
        num_negatives: int = 50,
        temperature: float = 0.5,
        prototype_pixels: str = "anchors",
        cutmix: Mapping[str, Any] | None = None,
        supervised_loss: str = "ce",
        ohem: Mapping[str, Any] | None = None,
        head_lr_multiplier: float = 1.0,
        supervised_only_steps: int = 0,
        inference: str = "teacher",
        teacher_copy_steps: int = 0,
        contrastive_normalization: str = "used_classes",
        **base: Any,
    ) -> None:
        # plain containers only, so that checkpoints load with torch.load(weights_only=True)
        cutmix, ohem = _plain(cutmix), _plain(ohem)
        base = {key: _plain(value) for key, value in base.items()}
        checks = {
            "supervised_loss": (supervised_loss, ("ce", "ohem", "shared")),
            "prototype_pixels": (prototype_pixels, ("anchors", "reliable")),
            "pseudo_loss_normalization": (pseudo_loss_normalization, PSEUDO_LOSS_NORMALIZATIONS),
            "inference": (inference, ("teacher", "student")),
            "contrastive_normalization": (contrastive_normalization, CONTRASTIVE_NORMALIZATIONS),
        }
        for key, (value, allowed) in checks.items():
            check_choice(f"method.{key}", value, allowed)
        if not 0.0 <= alpha_0 <= 100.0:
            raise ConfigError(f"method.alpha_0={alpha_0} must be a percentage in [0, 100]")
        if low_rank < 1 or high_rank <= low_rank:
            raise ConfigError(f"method.low_rank={low_rank}, high_rank={high_rank}: need 1 <= low_rank < high_rank")
        if temperature <= 0 or num_queries < 1 or num_negatives < 1:
            raise ConfigError("method.temperature, num_queries and num_negatives must be positive")
        self.ema_decay = ema_decay
        self.ema_buffers = ema_buffers
        self.teacher_train_mode = teacher_train_mode
        self.unsup_weight = unsup_weight
        self.alpha_0 = alpha_0
        self.pseudo_loss_normalization = pseudo_loss_normalization
        self.contrastive_weight = contrastive_weight
        self.rep_dim = rep_dim
        self.rep_dropout = rep_dropout
        self.queue_size = queue_size
        self.background_queue_size = background_queue_size
        self.background_index = background_index
        self.queue_dtype = queue_dtype
        self.requested_ranks = (low_rank, high_rank)
        self.anchor_threshold = anchor_threshold
        self.num_queries = num_queries
        self.num_negatives = num_negatives
        self.temperature = temperature
        self.prototype_pixels = prototype_pixels
        self.cutmix = {**DEFAULT_CUTMIX, **dict(cutmix or {})}
        self.supervised_loss_name = supervised_loss
        self.ohem = {**DEFAULT_OHEM, **dict(ohem or {})}
        self.head_lr_multiplier = head_lr_multiplier
        self.supervised_only_steps = supervised_only_steps
        self.inference = inference
        self.teacher_copy_steps = int(teacher_copy_steps)
        self.contrastive_normalization = contrastive_normalization
        self._joint: _JointPass | None = None
        super().__init__(**base)
        self.low_rank, self.high_rank = self.effective_ranks(low_rank, high_rank, self.num_classes)

    @staticmethod
    def effective_ranks(low_rank: int, high_rank: int, num_classes: int) -> tuple[int, int]:
        """Cap the rank window to the classes there are: ``low_rank <= C - 1``, ``high_rank <= C``."""
        low, high = min(low_rank, num_classes - 1), min(high_rank, num_classes)
        if low != low_rank:
            log.info(
                "u2pl: low_rank=%d leaves no rank for unlabeled negatives with %d classes; using low_rank=%d",
                low_rank,
                num_classes,
                low,
            )
        return low, high

    def configure_networks(self) -> None:
        if not 0 <= self.background_index < self.num_classes:
            raise ConfigError(f"method.background_index={self.background_index} is not a class index")
        self.net = U2PLNetwork(self.build_network(), dim=self.rep_dim, dropout=self.rep_dropout)
        self.teacher = EMATeacher(self.net, decay=self.ema_decay, buffers=self.ema_buffers)
        capacities = [self.queue_size] * self.num_classes
        capacities[self.background_index] = self.background_queue_size
        self.memory = ClassQueues(capacities, self.rep_dim, dtype=self.queue_dtype)
        # whether the teacher has taken over from the warmed-up student (saved, so that evaluating a checkpoint
        # written during the warm-up uses the network that was validated)
        self.register_buffer("teacher_started", torch.tensor(self.supervised_only_steps <= 0))
        self.register_load_state_dict_pre_hook(_teacher_started_default)

    @property
    def inference_network(self) -> nn.Module:
        """The teacher (``inference: teacher``) once it has taken over; the student before (warm-up)."""
        use_teacher = self.inference == "teacher" and bool(self.teacher_started)
        return self.teacher.module.segmenter if use_teacher else self.net.segmenter

    @property
    def num_params(self) -> int:
        # the teacher's parameters are frozen, so count them all
        return sum(p.numel() for p in self.inference_network.parameters())

    # ---- schedules ----------------------------------------------------------------------------
    def training_progress(self) -> float:
        """Share of training done: ``epoch / max_epochs`` for epoch budgets, else ``step / max_steps``."""
        trainer = self._trainer
        if trainer is None:
            return 0.0
        if trainer.max_steps and trainer.max_steps > 0:
            return min(1.0, self.global_step / trainer.max_steps)
        if trainer.max_epochs and trainer.max_epochs > 0:
            return min(1.0, self.current_epoch / trainer.max_epochs)
        return 0.0

    def alpha_t(self) -> float:
        """``α_t = α_0 (1 - progress)``, in percent."""
        return self.alpha_0 * (1.0 - self.training_progress())

    def semi_supervised_step(self) -> int:
        """Index of the current step within the semi-supervised phase (negative before it)."""
        return self.global_step - self.supervised_only_steps

    # ---- optimisation hooks -------------------------------------------------------------------
    def optimizer_parameter_groups(self) -> list[Any]:
        """Encoder at the configured learning rate, decoder and heads at ``head_lr_multiplier`` times it."""
        if self.head_lr_multiplier == 1.0:
            return super().optimizer_parameter_groups()
        if "lr" not in self.optimizer_config:
            raise ConfigError("method.head_lr_multiplier needs optimizer.lr to be set")
        encoder = {id(p) for p in self.net.segmenter.encoder.parameters()}
        params = list(self.trainable_parameters())
        backbone = [p for p in params if id(p) in encoder]
        heads = [p for p in params if id(p) not in encoder]
        head_lr = float(self.optimizer_config["lr"]) * self.head_lr_multiplier
        return [{"params": backbone}, {"params": heads, "lr": head_lr}]

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = self.semi_supervised_step() - 1  # the step just taken
        if step < 0:
            return
        self.teacher.update(self.net, self.teacher_decay(step))

    def teacher_decay(self, step: int) -> float:
        """The EMA decay of the teacher update after semi-supervised step ``step``: 0 (a copy) during
        ``teacher_copy_steps``, then ``min(1 - 1/(step + 1), ema_decay)``."""
        return 0.0 if step < self.teacher_copy_steps else ramped_ema_decay(step, self.ema_decay)

    # ---- losses -------------------------------------------------------------------------------
    def training_losses(self, labeled: Batch, unlabeled: Batch | None) -> tuple[torch.Tensor, LossTerms]:
        self._joint = None
        step = self.semi_supervised_step()
        if unlabeled is not None and step >= 0:
            if (step == 0 and self.supervised_only_steps > 0) or step < self.teacher_copy_steps:
                self.teacher.update(self.net, 0.0)  # the teacher starts from (or still is) the student
            self.teacher_started.fill_(True)
            self._joint = self.joint_forward(labeled, unlabeled)
        try:
            return super().training_losses(labeled, unlabeled)
        finally:
            self._joint = None

    @torch.no_grad()
    def _teacher_pass(self, image: torch.Tensor, train_mode: bool) -> tuple[torch.Tensor, torch.Tensor]:
        was_training = self.teacher.training
        self.teacher.train(train_mode)
        try:
            return self.teacher.module.forward_with_representation(image)
        finally:
            self.teacher.train(was_training)

    def joint_forward(self, labeled: Batch, unlabeled: Batch) -> _JointPass:
        """Pseudo-labels on the weak view, CutMix, then student and teacher on labeled + mixed images."""
        image_l, image_u = labeled["image"], unlabeled["image"]
        teacher_logits_u, _ = self._teacher_pass(image_u, train_mode=False)
        pseudo = teacher_logits_u.argmax(1)
        batch, _, height, width = image_u.shape
        boxes = cutmix_boxes(
            batch,
            height,
            width,
            prob=float(self.cutmix["prob"]),
            area=float(self.cutmix["area"]),
            aspect=tuple(self.cutmix["aspect"]),
            per_sample=bool(self.cutmix["per_sample"]),
            device=image_u.device,
        )
        image_mixed = mix(image_u, rolled(image_u), boxes)
        pseudo_mixed = mix(pseudo, rolled(pseudo), boxes)
        images = torch.cat([image_l, image_mixed])
        logits, representation = self.net.forward_with_representation(images)
        teacher_logits, teacher_representation = self._teacher_pass(images, train_mode=self.teacher_train_mode)
        return _JointPass(
            image_l.shape[0], logits, representation, teacher_logits, teacher_representation, pseudo_mixed
        )

    def labeled_loss(self, logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        class_weights = self.class_weights if self.class_weights.numel() else None
        if self.supervised_loss_name == "ce":
            return cross_entropy(logits, mask, self.ignore_index, class_weights=class_weights)
        if self.supervised_loss_name == "ohem":
            return ohem_cross_entropy(
                logits,
                mask,
                self.ignore_index,
                thresh=float(self.ohem["thresh"]),
                min_kept=int(self.ohem["min_kept"]),
                class_weights=class_weights,
            )
        return self.seg_loss(logits, mask)

    def supervised_loss(self, labeled: Batch) -> tuple[torch.Tensor, LossTerms]:
        if self._joint is not None:
            logits = self._joint.logits[: self._joint.num_labeled]
        else:  # supervised-only phase: keep the representation head in the graph (DDP needs every parameter)
            logits, representation = self.net.forward_with_representation(labeled["image"])
            self._idle_representation = representation
            if self.training and self.semi_supervised_step() < 0:
                self._teacher_pass(labeled["image"], train_mode=True)  # warms the teacher's BatchNorm statistics
        return self.labeled_loss(logits, labeled["mask"]), {}

    def unsupervised_loss(self, unlabeled: Batch, labeled: Batch) -> tuple[torch.Tensor, LossTerms]:
        joint = self._joint
        if joint is None:
            zero = self._idle_representation.sum() * 0.0
            return zero, {"loss_pseudo": zero.detach(), "loss_contrastive": zero.detach()}
        n_l = joint.num_labeled
        alpha = self.alpha_t()
        teacher_probs = joint.teacher_logits.softmax(1)
        pixel_entropy = entropy(teacher_probs[n_l:], eps=ENTROPY_EPS)
        valid_u = joint.pseudo_labels != self.ignore_index
        unreliable_u = extreme_share_mask(pixel_entropy, valid_u, alpha / 100.0, largest=True)
        loss_pseudo = pseudo_label_loss(
            joint.logits[n_l:], joint.pseudo_labels, valid_u & ~unreliable_u, self.pseudo_loss_normalization
        )
        terms: LossTerms = {"loss_pseudo": loss_pseudo, "alpha_t": torch.tensor(alpha)}
        loss = self.unsup_weight * loss_pseudo
        if self.contrastive_weight > 0:
            reliable_u = extreme_share_mask(pixel_entropy, valid_u, alpha / 100.0, largest=False)
            valid_l = labeled["mask"] != self.ignore_index
            size = joint.representation.shape[-2:]
            labels = downsample_labels(torch.cat([labeled["mask"], joint.pseudo_labels]), size)
            reliable = downsample_labels(torch.cat([valid_l, reliable_u]), size)
            unreliable = downsample_labels(torch.cat([valid_l, unreliable_u]), size)
            small_probs = F.interpolate(joint.teacher_logits, size=tuple(size), mode="bilinear", align_corners=False)
            is_labeled = torch.arange(labels.shape[0], device=labels.device) < n_l
            pixels = select_contrastive_pixels(
                labels,
                reliable,
                unreliable,
                small_probs.softmax(1),
                is_labeled,
                self.low_rank,
                self.high_rank,
                self.anchor_threshold,
                self.ignore_index,
                self.prototype_pixels,
            )
            loss_contrastive, classes_used = contrastive_loss(
                joint.representation,
                joint.teacher_representation,
                pixels,
                self.memory,
                self.num_queries,
                self.num_negatives,
                self.temperature,
                self.contrastive_normalization,
            )
            loss = loss + self.contrastive_weight * loss_contrastive
            terms.update(
                loss_contrastive=loss_contrastive,
                contrastive_classes=torch.tensor(float(classes_used)),
                queue_entries=torch.tensor(float(len(self.memory))),
            )
        else:
            loss = loss + joint.representation.sum() * 0.0  # keep the head in the graph
        # the decay of this step's teacher update, from the step alone (a resumed run logs what the run would)
        terms["ema_decay"] = torch.tensor(self.teacher_decay(self.semi_supervised_step()))
        return loss, terms
