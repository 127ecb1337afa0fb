"""Pseudo-labels from teacher predictions: Inconsistency Masks, model ensembles, input ensembles.

Every function works on a batch of teacher outputs; nothing here trains.

* **Inconsistency Mask** (Vorndran et al., arXiv 2401.14387). Binary task: each of the ``n`` teachers'
  foreground probability is thresholded (0.5); pixels where all ``n`` agree take that label, pixels where
  ``0 < sum < n`` form the mask. Multiclass: the argmax of each teacher; the mask is where not all argmaxes
  agree. The mask may then be eroded and/or dilated (square kernels; 0 = off, the default; erosion first as
  in the official code, ``morph_order``).
* **Keep filter** (the official binary code's ``filter_bad_predictions``): an image is kept only if the area
  all teachers call foreground is non-zero and larger than the inconsistency area, both counted before any
  dilation/erosion of the mask.
* **Model ensemble**: the argmax of the teachers' mean softmax (binary: optionally the official unanimous vote);
  nothing is masked.
* **Input ensemble** (test-time augmentation), nothing masked: ``dihedral``, the argmax of one teacher's mean
  softmax over the eight flips/rotations of the image, each mapped back; or ``random`` (the official
  ``use_n_rnd_transformations``): ``n`` views, each a random flip/turn (from the 12 with a quarter, half or
  three-quarter turn, drawn with replacement) plus blur, noise and brightness; each view's hard labels are mapped
  back; binary: foreground only where every view votes it (unanimous), multiclass: the most frequent label.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from semiseg.errors import ConfigError
from semiseg.methods.self_training.offline_augment import PhotometricNoise, apply_geometry, photometric


def binary_inconsistency_mask(
    foreground_probs: torch.Tensor, threshold: float = 0.5
) -> tuple[torch.Tensor, torch.Tensor]:
    """IM of a binary task.

    Args:
        foreground_probs: ``(n, B, H, W)`` foreground probability of each of the ``n`` teachers.
        threshold: a teacher votes foreground where its probability is above ``threshold``.

    Returns:
        ``labels (B, H, W)`` int64 (1 where all voted foreground, else 0) and ``mask (B, H, W)`` bool
        (``True`` where the teachers disagree).
    """
    votes = (foreground_probs > threshold).sum(dim=0)
    num_teachers = foreground_probs.shape[0]
    labels = (votes == num_teachers).long()
    mask = (votes > 0) & (votes < num_teachers)
    return labels, mask


def multiclass_inconsistency_mask(teacher_labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """IM of a multiclass task.

    Args:
        teacher_labels: ``(n, B, H, W)`` int64, the argmax of each teacher.

    Returns:
        ``labels (B, H, W)`` (the first teacher's label; equal to all of them where unmasked) and
        ``mask (B, H, W)`` bool, ``True`` where not all teachers agree.
    """
    agree = (teacher_labels == teacher_labels[:1]).all(dim=0)
    return teacher_labels[0].clone(), ~agree


MORPH_ORDERS = ("erode_dilate", "dilate_erode")


def morph_mask(
    mask: torch.Tensor, dilate_kernel: int = 0, erode_kernel: int = 0, order: str = "erode_dilate"
) -> torch.Tensor:
    """Erode, then dilate (``erode_dilate``, the official order: an opening that removes specks) or dilate, then
    erode (``dilate_erode``: a closing), a boolean ``(B, H, W)`` mask with square kernels (size 0 or 1: no
    change)."""
    if order not in MORPH_ORDERS:
        raise ConfigError(f"method.morph_order={order!r} must be one of {list(MORPH_ORDERS)}")
    steps = ((erode_kernel, False), (dilate_kernel, True))
    for size, dilate in steps if order == "erode_dilate" else steps[::-1]:
        if size < 0:
            raise ConfigError(f"method.{'dilate' if dilate else 'erode'}_kernel={size} must be >= 0")
        if size <= 1:
            continue
        values = mask.float().unsqueeze(1)
        if not dilate:
            values = 1.0 - values
        # an even kernel needs asymmetric padding to keep the size
        left, right = (size - 1) // 2, size // 2
        padded = F.pad(values, (left, right, left, right), value=0.0)
        grown = F.max_pool2d(padded, kernel_size=size, stride=1)
        mask = (grown if dilate else 1.0 - grown).squeeze(1) > 0.5
    return mask


def inconsistency_mask(
    probs: torch.Tensor,
    threshold: float = 0.5,
    dilate_kernel: int = 0,
    erode_kernel: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """IM pseudo-labels from the softmax of ``n`` teachers.

    Args:
        probs: ``(n, B, C, H, W)`` softmax of each teacher; ``C == 2`` is the binary case (the
            foreground probability is thresholded at ``threshold``), ``C > 2`` the multiclass one.
        threshold: the binary vote threshold.
        dilate_kernel, erode_kernel: square kernel sizes applied to the mask (0: none).

    Returns:
        ``labels (B, H, W)`` int64 and ``mask (B, H, W)`` bool (``True``: inconsistent, not a pseudo-label).
    """
    if probs.ndim != 5 or probs.shape[0] < 2:
        raise ConfigError(
            f"an Inconsistency Mask needs at least 2 teachers (got {probs.shape[0] if probs.ndim == 5 else 0}); "
            "set method.num_teachers >= 2"
        )
    if probs.shape[2] == 2:
        labels, mask = binary_inconsistency_mask(probs[:, :, 1], threshold)
    else:
        labels, mask = multiclass_inconsistency_mask(probs.argmax(dim=2))
    return labels, morph_mask(mask, dilate_kernel, erode_kernel)


def filter_bad_predictions(labels: torch.Tensor, mask: torch.Tensor, background_index: int = 0) -> torch.Tensor:
    """Which images the official binary IM code keeps: ``(B,)`` bool, true where the agreed foreground area is
    non-zero and larger than the inconsistency area (``predsize > im_size and predsize > 0``).

    Args:
        labels: ``(B, H, W)`` pseudo-labels (1 where all teachers voted foreground).
        mask: ``(B, H, W)`` bool inconsistency mask, before dilation/erosion.
        background_index: the label that is not foreground.
    """
    foreground = ((labels != background_index) & ~mask).flatten(1).sum(dim=1)
    inconsistent = mask.flatten(1).sum(dim=1)
    return (foreground > 0) & (foreground > inconsistent)


ENSEMBLE_VOTES = ("mean", "unanimous")


def model_ensemble(
    probs: torch.Tensor, vote: str = "mean", threshold: float = 0.5
) -> tuple[torch.Tensor, torch.Tensor]:
    """``probs (n, B, C, H, W)`` -> labels ``(B, H, W)`` and an all-False mask.

    ``vote: mean``: argmax of the mean softmax. ``unanimous`` (binary tasks, the official
    ``get_model_ensemble_prediction_ISIC_2018``): foreground only where every teacher's foreground probability
    is above ``threshold``; multiclass tasks keep the mean.
    """
    if vote not in ENSEMBLE_VOTES:
        raise ConfigError(f"method.ensemble_vote={vote!r} must be one of {list(ENSEMBLE_VOTES)}")
    if vote == "unanimous" and probs.shape[2] == 2:
        labels, _ = binary_inconsistency_mask(probs[:, :, 1], threshold)
    else:
        labels = probs.mean(dim=0).argmax(dim=1)
    return labels, torch.zeros_like(labels, dtype=torch.bool)


# the eight symmetries of the square: (number of 90° rotations, horizontal flip)
DIHEDRAL = tuple((turns, flip) for flip in (False, True) for turns in range(4))


def _apply(image: torch.Tensor, turns: int, flip: bool) -> torch.Tensor:
    if flip:
        image = image.flip(-1)
    return torch.rot90(image, turns, dims=(-2, -1))


def _undo(image: torch.Tensor, turns: int, flip: bool) -> torch.Tensor:
    image = torch.rot90(image, -turns, dims=(-2, -1))
    return image.flip(-1) if flip else image


def input_ensemble_probs(
    predict: Callable[[torch.Tensor], torch.Tensor],
    image: torch.Tensor,
    transforms: Sequence[tuple[int, bool]] = DIHEDRAL,
) -> torch.Tensor:
    """Mean softmax ``(B, C, H, W)`` of ``predict`` over flipped/rotated copies of ``image (B, C, H, W)``.

    Rotations by 90° need square images; on non-square images only the flips (0 and 180° turns) are used.
    """
    if image.shape[-1] != image.shape[-2]:
        transforms = [(turns, flip) for turns, flip in transforms if turns % 2 == 0]
    total = None
    for turns, flip in transforms:
        probs = _undo(predict(_apply(image, turns, flip)).softmax(dim=1), turns, flip)
        total = probs if total is None else total + probs
    assert total is not None
    return total / len(transforms)


def hard_labels(logits: torch.Tensor, binary_threshold: float = 0.5) -> torch.Tensor:
    """``logits (B, K, H, W)`` -> ``(B, H, W)`` uint8 votes: foreground where its probability is above
    ``binary_threshold`` (``K == 2``), else the argmax."""
    if logits.shape[1] == 2:
        return (logits.softmax(dim=1)[:, 1] > binary_threshold).to(torch.uint8)
    return logits.argmax(dim=1).to(torch.uint8)


INPUT_ENSEMBLE_MODES = ("random", "dihedral")
# the official random views: (vertical flip, horizontal flip, clockwise quarter turns 1..3)
RANDOM_VIEW_GEOMETRIES = tuple((v, h, t) for v in (False, True) for h in (False, True) for t in (1, 2, 3))


def undo_geometry(array: np.ndarray, vertical: bool, horizontal: bool, turns: int) -> np.ndarray:
    """The inverse of :func:`apply_geometry` on ``array (H, W[, ...])``."""
    array = np.rot90(array, k=turns, axes=(0, 1))
    if horizontal:
        array = array[:, ::-1]
    if vertical:
        array = array[::-1]
    return np.ascontiguousarray(array)


def vote_of_views(view_labels: np.ndarray, num_classes: int) -> np.ndarray:
    """``view_labels (n, H, W)`` hard labels -> ``(H, W)``: binary (``num_classes == 2``) foreground only where
    every view votes it (the official ``mask_sum >= n``), else the most frequent label (ties: the lowest index,
    as ``np.argmax(np.bincount(...))``)."""
    if num_classes == 2:
        return (view_labels == 1).all(axis=0).astype(np.int64)
    counts = np.stack([(view_labels == k).sum(axis=0) for k in range(num_classes)])
    return counts.argmax(axis=0).astype(np.int64)


@torch.no_grad()
def random_view_labels(
    predict: Callable[[torch.Tensor], torch.Tensor],
    image: np.ndarray,
    normalise: Callable[[np.ndarray], torch.Tensor],
    noise: PhotometricNoise,
    num_views: int,
    rng: np.random.Generator,
    binary_threshold: float = 0.5,
    device: torch.device | str = "cpu",
) -> np.ndarray:
    """The official random input ensemble of one ``image (H, W, C)`` uint8 -> labels ``(H, W)`` int64.

    On a non-square image only the half turn keeps the shape, so every view is turned by 180°."""
    height, width = image.shape[:2]
    geometries = RANDOM_VIEW_GEOMETRIES if height == width else tuple(g for g in RANDOM_VIEW_GEOMETRIES if g[2] == 2)
    chosen = [geometries[int(rng.integers(len(geometries)))] for _ in range(num_views)]
    views = [photometric(apply_geometry(image, *geometry), noise, rng) for geometry in chosen]
    logits = predict(torch.stack([normalise(view) for view in views]).to(device))
    hard = hard_labels(logits, binary_threshold).cpu().numpy()
    restored = np.stack([undo_geometry(h, *g) for h, g in zip(hard, chosen, strict=True)])
    return vote_of_views(restored, int(logits.shape[1]))
