"""The deterministic, stratified split of a dataset into labeled, unlabeled, validation and test parts.

The split depends only on the dataset's sample ids and strata, ``split_seed``, the fractions and
``labeled_ratio`` — never on the method or the training seed — so every method sees the same labeled
images. Strata are the sets of defect classes in each image; every stratum is divided in proportion
(largest remainders), and a defect class present in the pool but missing from the labeled part is
brought in, so that a 10% split keeps the rare classes. Labeled sets are nested: at the same
``split_seed`` the images labeled at ratio 0.1 are also labeled at ratio 0.3.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from semiseg.data.datasets.base import Sample
from semiseg.errors import ConfigError, DataError
from semiseg.io import atomic_write_text

PARTS = ("labeled", "unlabeled", "val", "test")


@dataclass
class Split:
    """Image ids of each part (``labeled`` keep their masks; ``unlabeled`` never show theirs)."""

    labeled: list[str]
    unlabeled: list[str]
    val: list[str]
    test: list[str]
    meta: dict = field(default_factory=dict)

    def sizes(self) -> dict[str, int]:
        return {part: len(getattr(self, part)) for part in PARTS}

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    def save(self, path: str | Path) -> None:
        atomic_write_text(Path(path), self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> Split:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"split_file={path}: no such file; give the split.json of an earlier run")
        try:
            data = json.loads(path.read_text())
            return cls(**{part: list(data[part]) for part in PARTS}, meta=data.get("meta", {}))
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise ConfigError(
                f"split_file={path}: not a split.json ({error}); it needs the lists {list(PARTS)}"
            ) from None


def _stratum_key(classes: frozenset[int] | None) -> tuple[int, ...]:
    return tuple(sorted(classes)) if classes is not None else (-1,)


def _rng(split_seed: int, purpose: str) -> np.random.Generator:
    digest = hashlib.sha256(f"{split_seed}:{purpose}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def _ordered_strata(samples: Sequence[Sample], rng: np.random.Generator) -> dict[tuple, list[Sample]]:
    """Samples grouped by stratum, each group in a seeded random order (independent of input order)."""
    groups: dict[tuple, list[Sample]] = defaultdict(list)
    for sample in sorted(samples, key=lambda s: s.id):
        groups[_stratum_key(sample.classes)].append(sample)
    ordered = {}
    for key in sorted(groups):
        group = groups[key]
        ordered[key] = [group[i] for i in rng.permutation(len(group))]
    return ordered


def _allocate(sizes: dict[tuple, int], total: int) -> dict[tuple, int]:
    """Split ``total`` among strata in proportion to their sizes (largest remainders)."""
    count = sum(sizes.values())
    quotas = {key: total * size / count for key, size in sizes.items()}
    taken = {key: math.floor(q) for key, q in quotas.items()}
    by_remainder = sorted(quotas, key=lambda k: (-(quotas[k] - taken[k]), k))
    for key in by_remainder[: total - sum(taken.values())]:
        taken[key] += 1
    return taken


def stratified_take(
    samples: Sequence[Sample], fraction: float, rng: np.random.Generator, minimum: int = 0
) -> tuple[list[Sample], list[Sample]]:
    """Take ``round(fraction * n)`` samples (at least ``minimum``) stratified; return (taken, rest).

    Taken samples are the first of each stratum's seeded order, so a larger fraction takes a superset.
    """
    groups = _ordered_strata(samples, rng)
    total = min(len(samples), max(minimum, round(fraction * len(samples))))
    counts = _allocate({key: len(group) for key, group in groups.items()}, total)
    taken, rest = [], []
    for key, group in groups.items():
        taken += group[: counts[key]]
        rest += group[counts[key] :]
    return taken, rest


def _classes_of(part: Sequence[Sample]) -> set[int]:
    return set().union(*(s.classes or frozenset() for s in part))


def _cover_rare_classes(
    labeled: list[Sample], unlabeled: list[Sample], rank: dict[str, int]
) -> tuple[list[Sample], list[Sample]]:
    """Swap images so every defect class of the pool appears in the labeled part, keeping its size.

    For each missing class, the first unlabeled image (in the seeded ``rank``) holding it comes in, and a
    labeled image from the most crowded stratum, whose classes stay covered without it, goes out.
    """
    labeled, unlabeled = list(labeled), list(unlabeled)
    for missing in sorted(_classes_of(unlabeled) - _classes_of(labeled)):
        if missing in _classes_of(labeled):
            continue
        incoming = min((s for s in unlabeled if s.classes and missing in s.classes), key=lambda s: rank[s.id])
        unlabeled.remove(incoming)
        labeled.append(incoming)
        crowd: dict[tuple, int] = defaultdict(int)
        for sample in labeled:
            crowd[_stratum_key(sample.classes)] += 1
        removable = [
            s
            for s in labeled
            if s is not incoming
            and crowd[_stratum_key(s.classes)] > 1
            and _classes_of([x for x in labeled if x is not s]) >= _classes_of(labeled)
        ]
        if removable:
            outgoing = max(removable, key=lambda s: (crowd[_stratum_key(s.classes)], rank[s.id]))
            labeled.remove(outgoing)
            unlabeled.append(outgoing)
    return labeled, unlabeled


def make_split(
    train_pool: Sequence[Sample],
    test_pool: Sequence[Sample] | None,
    labeled_ratio: float,
    split_seed: int,
    val_fraction: float,
    test_fraction: float,
    extra_unlabeled: Sequence[Sample] = (),
    val_pool: Sequence[Sample] | None = None,
    test_on_val: bool = False,
) -> Split:
    """Split a dataset's pools.

    Args:
        train_pool: images with masks for training (and validation).
        test_pool: the official test split, or ``None`` to carve ``test_fraction`` of ``train_pool``.
        labeled_ratio: share of the remaining training images that keep their masks, ``0 < r <= 1``.
        split_seed: the only source of randomness.
        val_fraction: share of the training pool held out for validation (model selection).
        test_fraction: share of the pool held out for testing when there is no official test split.
        extra_unlabeled: images that never had masks; always unlabeled.
        val_pool: an official validation split, used as is (``val_fraction`` is then not used).
        test_on_val: validate on the test part itself (``val = test``; ``val_fraction`` unused). The UAPS
            Magnetic Tiles code selects and reports on the same 20 %: an optimistic protocol, offered only to
            reproduce its numbers.
    """
    if not 0.0 < labeled_ratio <= 1.0:
        raise ConfigError(f"labeled_ratio={labeled_ratio} must lie in (0, 1]; e.g. labeled_ratio=0.1")
    for key, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= value < 1.0:
            raise ConfigError(f"dataset.{key}={value} must lie in [0, 1)")
    pool = list(train_pool)
    if test_pool is None:
        test, pool = stratified_take(pool, test_fraction, _rng(split_seed, "test"), minimum=1)
    else:
        test = list(test_pool)
    if test_on_val:
        val = list(test)
    elif val_pool is None:
        val, pool = stratified_take(pool, val_fraction, _rng(split_seed, "val"), minimum=1 if val_fraction else 0)
    else:
        val = list(val_pool)
    if not pool:
        raise ConfigError(
            f"the split leaves no training images ({len(train_pool)} in the pool, val_fraction={val_fraction}, "
            f"test_fraction={test_fraction}); lower the fractions or add images"
        )
    labeled_rng = _rng(split_seed, "labeled")
    labeled, unlabeled = stratified_take(pool, labeled_ratio, labeled_rng, minimum=1)
    if labeled_ratio < 1.0:
        ids = sorted(s.id for s in pool)
        rank = dict(zip(ids, labeled_rng.permutation(len(ids)).tolist(), strict=True))
        labeled, unlabeled = _cover_rare_classes(labeled, unlabeled, rank)
    if not labeled:
        raise ConfigError(f"labeled_ratio={labeled_ratio} leaves no labeled image; raise it")
    unlabeled += list(extra_unlabeled)
    return Split(
        labeled=sorted(s.id for s in labeled),
        unlabeled=sorted(s.id for s in unlabeled),
        val=sorted(s.id for s in val),
        test=sorted(s.id for s in test),
        meta={
            "labeled_ratio": labeled_ratio,
            "split_seed": split_seed,
            "val_fraction": val_fraction if val_pool is None and not test_on_val else None,
            "test_fraction": test_fraction if test_pool is None else None,
            **({"test_on_val": True} if test_on_val else {}),
        },
    )


def check_split_ids(split: Split, known_ids: set[str], source: str) -> None:
    """A reused split may only name images of the dataset, each in one part."""
    seen: dict[str, str] = {}
    test_on_val = bool(split.meta.get("test_on_val")) and split.val == split.test
    for part in PARTS:
        if part == "val" and test_on_val:
            continue  # the same images as the test part, by the split's own declaration
        for image_id in getattr(split, part):
            if image_id not in known_ids:
                raise DataError(
                    f"{source}: image '{image_id}' ({part}) is not in the dataset; the split file belongs to "
                    "another dataset or version — drop split_file to make a new split"
                )
            if image_id in seen:
                raise DataError(f"{source}: image '{image_id}' is in both '{seen[image_id]}' and '{part}'")
            seen[image_id] = part
    if not split.labeled:
        raise DataError(f"{source}: the split has no labeled image")
