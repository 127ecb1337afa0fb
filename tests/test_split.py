"""Split properties: disjoint, deterministic, stratified, ratio honoured, independent of the method."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from semiseg.data.datasets.base import Sample
from semiseg.data.datasets.synthetic import SyntheticDefects
from semiseg.data.split import PARTS, Split, check_split_ids, make_split
from semiseg.errors import ConfigError, DataError


def pool(n: int = 200, rare_every: int = 40) -> list[Sample]:
    """Samples with class 1 common, class 2 rare (every ``rare_every``-th image), some defect-free."""
    samples = []
    for i in range(n):
        classes = {2} if i % rare_every == 0 else ({1} if i % 3 else set())
        samples.append(Sample(id=f"img{i:04d}", image=i, mask=i, classes=frozenset(classes)))
    return samples


def split_of(ratio: float = 0.1, seed: int = 0, samples: list[Sample] | None = None) -> Split:
    return make_split(samples or pool(), None, ratio, seed, val_fraction=0.1, test_fraction=0.2)


def test_parts_are_disjoint_and_cover_the_pool() -> None:
    split = split_of()
    ids = [i for part in PARTS for i in getattr(split, part)]
    assert len(ids) == len(set(ids)) == 200


def test_same_inputs_same_split_and_split_seed_changes_it() -> None:
    assert split_of().to_json() == split_of().to_json()
    assert split_of(seed=1).labeled != split_of(seed=0).labeled


def test_split_does_not_depend_on_input_order() -> None:
    assert split_of(samples=list(reversed(pool()))).to_json() == split_of().to_json()


@pytest.mark.parametrize("ratio", [0.05, 0.1, 0.3, 0.5, 1.0])
def test_ratio_is_honoured(ratio: float) -> None:
    split = split_of(ratio)
    train_pool = len(split.labeled) + len(split.unlabeled)
    assert len(split.labeled) == max(1, round(ratio * train_pool))


def test_held_out_parts_do_not_depend_on_the_ratio() -> None:
    low, high = split_of(0.1), split_of(0.5)
    assert (low.val, low.test) == (high.val, high.test)


def test_rare_class_kept_at_low_ratio() -> None:
    samples = pool(rare_every=40)  # 5 images with the rare class
    for seed in range(10):
        split = make_split(samples, None, 0.05, seed, val_fraction=0.1, test_fraction=0.2)
        classes = {c for s in samples if s.id in set(split.labeled) for c in s.classes}
        assert 2 in classes and 1 in classes


def test_strata_proportions_in_held_out_parts() -> None:
    samples = pool(n=300, rare_every=10)
    split = make_split(samples, None, 0.1, 0, val_fraction=0.2, test_fraction=0.2)
    by_id = {s.id: s for s in samples}
    rare_share = [
        sum(2 in by_id[i].classes for i in getattr(split, part)) / len(getattr(split, part)) for part in ("val", "test")
    ]
    assert all(abs(share - 0.1) < 0.02 for share in rare_share)


def test_labeled_sets_are_nested_across_ratios() -> None:
    low, high = set(split_of(0.1).labeled), set(split_of(0.3).labeled)
    assert len(low - high) <= 1  # a swap that covers a rare class may differ


def test_official_test_split_is_kept() -> None:
    train, test = pool(100), [Sample(f"t{i}", i, i, frozenset()) for i in range(7)]
    split = make_split(train, test, 0.2, 0, val_fraction=0.1, test_fraction=0.5)
    assert split.test == sorted(s.id for s in test)


@pytest.mark.parametrize("ratio", [0.0, -0.1, 1.5])
def test_bad_ratio_is_rejected(ratio: float) -> None:
    with pytest.raises(ConfigError, match="labeled_ratio"):
        split_of(ratio)


def test_split_leaving_no_training_image_is_rejected() -> None:
    with pytest.raises(ConfigError, match="no training images"):
        make_split(pool(2), None, 0.5, 0, val_fraction=0.5, test_fraction=0.5)


def test_split_file_roundtrip_and_unknown_ids(tmp_path: Path) -> None:
    split = split_of()
    split.save(tmp_path / "split.json")
    again = Split.load(tmp_path / "split.json")
    assert again.to_json() == split.to_json()
    check_split_ids(again, {s.id for s in pool()}, "split.json")
    with pytest.raises(DataError, match="img0000"):
        check_split_ids(again, {s.id for s in pool()} - {"img0000"}, "split.json")


def test_split_of_synthetic_dataset_does_not_depend_on_training_seed(make_cfg) -> None:
    from semiseg.methods.supervised import Supervised
    from semiseg.runner import build_datamodule

    splits = [build_datamodule(make_cfg(f"seed={seed}"), Supervised).split.to_json() for seed in (0, 1)]
    assert splits[0] == splits[1]


def test_unlabeled_batches_carry_no_mask(make_cfg) -> None:
    from semiseg.methods.base import SemiSupervisedModule
    from semiseg.runner import build_datamodule

    datamodule = build_datamodule(make_cfg(), SemiSupervisedModule)
    batch, *_ = next(iter(datamodule.train_dataloader()))
    assert set(batch) == {"labeled", "unlabeled"}
    assert "mask" in batch["labeled"] and "mask" not in batch["unlabeled"]
    assert batch["labeled"]["image"].shape == (4, 3, 32, 32) and batch["labeled"]["mask"].dtype == torch.int64
    labeled_ids, unlabeled_ids = set(datamodule.split.labeled), set(datamodule.split.unlabeled)
    assert set(batch["labeled"]["id"]) <= labeled_ids and set(batch["unlabeled"]["id"]) <= unlabeled_ids


def test_labeled_loader_cycles_when_shorter(make_cfg) -> None:
    from semiseg.methods.base import SemiSupervisedModule
    from semiseg.runner import build_datamodule

    datamodule = build_datamodule(make_cfg(), SemiSupervisedModule)
    loader = datamodule.train_dataloader()
    unlabeled_batches = len(datamodule.split.unlabeled) // 4
    assert unlabeled_batches > max(1, len(datamodule.split.labeled) // 4)
    labeled_seen = [image_id for batch, *_ in loader for image_id in batch["labeled"]["id"]]
    assert len(labeled_seen) == 4 * unlabeled_batches > len(set(labeled_seen))


def test_strata_of_synthetic_images_match_their_masks() -> None:
    dataset = SyntheticDefects(num_images=30, image_size=(64, 64))
    for sample in dataset.train_samples:
        _, mask = dataset.load(sample)
        present = set(mask.ravel().tolist()) - {0}
        assert present <= sample.classes
