"""Partial labels: generation, the label store, region growing, focal / SuperLoss, and cps_rg's three stages."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import get_class, instantiate
from PIL import Image
from scipy.special import lambertw

from semiseg.data.datasets.synthetic import SyntheticDefects
from semiseg.data.partial import LabelStore, PartialLabels, make_partial_mask, sample_rng
from semiseg.errors import ConfigError
from semiseg.losses import cross_entropy, focal_loss, lambert_w, superloss, superloss_confidence
from semiseg.methods.region_growing import box_neighbourhood, grow_regions, per_class_values
from semiseg.runner import build_datamodule
from semiseg.train import train

IGNORE = 255


# ---- region growing ---------------------------------------------------------------------------------
def strip_probabilities(class1: list[float]) -> torch.Tensor:
    """A 1 x W strip of 3-class probabilities: class 1 has ``class1``, the rest split evenly."""
    p1 = torch.tensor(class1)
    rest = (1 - p1) / 2
    return torch.stack([rest, p1, rest]).unsqueeze(1).unsqueeze(0)  # (1, 3, 1, W)


def strip_labels(values: dict[int, int], width: int) -> torch.Tensor:
    labels = torch.full((1, 1, width), IGNORE, dtype=torch.long)
    for x, c in values.items():
        labels[0, 0, x] = c
    return labels


def test_growing_stays_in_the_neighbourhood_and_above_the_threshold() -> None:
    # class 1 is likely (0.9) everywhere except pixel 6 (0.5, below its threshold 0.8)
    probs = strip_probabilities([0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.5, 0.9, 0.9, 0.9])
    seeds = strip_labels({0: 1}, 10)
    grown, rounds = grow_regions(probs, seeds, neighbourhood=[3, 3, 3], threshold=[0.8, 0.8, 0.8], ignore_index=IGNORE)
    # a 3-box reaches one pixel per round: 1..5 grow, 6 is too unlikely and blocks 7..9
    assert grown[0, 0].tolist() == [1, 1, 1, 1, 1, 1, IGNORE, IGNORE, IGNORE, IGNORE]
    assert rounds == 5
    # a 5-box jumps over pixel 6
    grown, _ = grow_regions(probs, seeds, neighbourhood=[5, 5, 5], threshold=[0.8, 0.8, 0.8], ignore_index=IGNORE)
    assert grown[0, 0].tolist() == [1, 1, 1, 1, 1, 1, IGNORE, 1, 1, 1]
    # the per-class threshold is honoured: class 1 at 0.95 grows nowhere
    grown, rounds = grow_regions(probs, seeds, [5, 5, 5], [0.8, 0.95, 0.8], IGNORE)
    assert torch.equal(grown, seeds) and rounds == 0


def test_growing_never_overwrites_given_labels_and_stops() -> None:
    probs = strip_probabilities([0.9] * 8)
    seeds = strip_labels({0: 1, 3: 2, 7: 0}, 8)  # 3 and 7 are given with classes the networks disagree with
    grown, _ = grow_regions(probs, seeds, [3, 3, 3], [0.5, 0.5, 0.5], IGNORE)
    assert grown[0, 0, 3] == 2 and grown[0, 0, 7] == 0 and grown[0, 0, 0] == 1
    # a 3-box from pixel 0 grows 1, 2; pixel 3 is labeled 2 so 4..6 are not reachable for class 1
    assert grown[0, 0].tolist() == [1, 1, 1, 2, IGNORE, IGNORE, IGNORE, 0]
    again, more = grow_regions(probs, grown, [3, 3, 3], [0.5, 0.5, 0.5], IGNORE)
    assert torch.equal(again, grown) and more == 0  # converged: nothing changes any more


def test_growing_in_two_dimensions_and_per_class_switch() -> None:
    probs = torch.zeros(1, 2, 6, 6)
    probs[0, 0] = 0.9  # background everywhere
    probs[0, 1] = 0.1
    seeds = torch.full((1, 6, 6), IGNORE, dtype=torch.long)
    seeds[0, 0, 0] = 0
    grown, _ = grow_regions(probs, seeds, [2, 2], [0.8, 0.8], IGNORE)
    assert (grown == 0).all()  # the whole map is one connected likely-background area
    frozen, rounds = grow_regions(probs, seeds, [2, 2], [0.8, 0.8], IGNORE, grow_classes=[False, True])
    assert torch.equal(frozen, seeds) and rounds == 0


def test_box_neighbourhood_sizes() -> None:
    labels = torch.zeros(1, 7, 7, dtype=torch.bool)
    labels[0, 3, 3] = True
    assert box_neighbourhood(labels, 3).sum() == 9
    even = box_neighbourhood(labels, 4)  # one pixel further right/down
    assert even.sum() == 16 and even[0, 2:6, 2:6].all()
    assert box_neighbourhood(labels, 1).sum() == 1


def test_per_class_values_forms_and_errors() -> None:
    names = ["background", "a", "b"]
    assert per_class_values(0.5, names, "k") == [0.5, 0.5, 0.5]
    assert per_class_values([1, 2, 3], names, "k", int) == [1, 2, 3]
    assert per_class_values({"background": 30, "default": 20}, names, "k", int) == [30, 20, 20]
    with pytest.raises(ConfigError, match="unknown classes"):
        per_class_values({"c": 1, "default": 2}, names, "k")
    with pytest.raises(ConfigError, match="3 classes"):
        per_class_values([1, 2], names, "k")


# ---- losses -----------------------------------------------------------------------------------------
def test_focal_loss_against_hand_computed_values() -> None:
    # pixel 1: p_target = 0.5; pixel 2: p_target = 0.75; pixel 3 ignored
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0], [5.0, -5.0]]).T.reshape(1, 2, 1, 3)
    target = torch.tensor([[[1, 0, IGNORE]]])
    first = 0.5**3 * math.log(2.0)  # 0.0866434
    second = 0.25**3 * -math.log(0.75)  # 0.0044950
    assert focal_loss(logits, target, gamma=3.0, ignore_index=IGNORE).item() == pytest.approx((first + second) / 2)
    # γ = 0 is the cross-entropy
    assert focal_loss(logits, target, gamma=0.0).item() == pytest.approx(cross_entropy(logits, target).item())
    # class weights scale each pixel by its class's weight
    weighted = focal_loss(logits, target, 3.0, IGNORE, torch.tensor([2.0, 1.0])).item()
    assert weighted == pytest.approx((first + 2 * second) / 2)
    # nothing labeled: exactly zero, with a graph
    empty = focal_loss(logits.requires_grad_(), torch.full_like(target, IGNORE))
    assert empty.item() == 0.0 and empty.requires_grad


def test_lambert_w_matches_scipy() -> None:
    assert lambert_w(torch.tensor([-1 / math.e, -1.0])).tolist() == pytest.approx([-1.0, -1.0])  # clamped
    x = torch.tensor([-1 / math.e + 1e-12, -0.3, -0.05, 0.0, 0.3, 1.0, math.e, 50.0, 1e4], dtype=torch.float64)
    assert torch.allclose(lambert_w(x), torch.from_numpy(lambertw(x.numpy()).real), atol=1e-7)


def test_superloss_against_hand_computed_values() -> None:
    lam, tau = 0.25, 1.0
    # ℓ = τ: σ* = 1, loss 0; ℓ - τ = 2eλ: W(e) = 1, σ* = 1/e, loss = 2λ + λ = 3λ;
    # ℓ - τ <= -2λ/e (clamped): W(-1/e) = -1, σ* = e, loss = (ℓ - τ) e + λ
    loss = torch.tensor([tau, tau + 2 * math.e * lam, tau - 1.0], requires_grad=True)
    sigma = superloss_confidence(loss, tau, lam)
    assert sigma.tolist() == pytest.approx([1.0, 1 / math.e, math.e], rel=1e-6)
    value = superloss(loss, tau, lam)
    assert value.tolist() == pytest.approx([0.0, 3 * lam, -1.0 * math.e + lam], rel=1e-6, abs=1e-7)
    value.sum().backward()
    assert loss.grad.tolist() == pytest.approx(sigma.tolist(), rel=1e-6)  # gradient is σ*: easy pixels count more


# ---- partial-label generation -----------------------------------------------------------------------
def two_region_mask() -> np.ndarray:
    mask = np.zeros((40, 40), dtype=np.int64)
    mask[5:15, 5:25] = 1  # a blob
    mask[30:32, 2:38] = 2  # a thin line
    mask[20, 35] = 1  # a single pixel region
    mask[0, 0] = IGNORE  # already unknown
    return mask


@pytest.mark.parametrize(
    "spec",
    [
        PartialLabels(mode="points", points_per_region=3, background_share=0.05),
        PartialLabels(mode="scribble", width=1, background_share=0.05),
        PartialLabels(mode="erode", radius=2, background_share=0.05),
    ],
)
def test_partial_labels_are_deterministic_and_only_remove_labels(spec: PartialLabels) -> None:
    mask = two_region_mask()
    partial = make_partial_mask(mask, spec, sample_rng(0, "img_1"), IGNORE)
    again = make_partial_mask(mask, spec, sample_rng(0, "img_1"), IGNORE)
    assert np.array_equal(partial, again)
    kept = partial != IGNORE
    assert np.array_equal(partial[kept], mask[kept])  # only removes labels
    assert partial[0, 0] == IGNORE
    assert 0 < kept.mean() < 0.5
    # every defect region keeps at least one labeled pixel, the single-pixel one included
    assert (partial[5:15, 5:25] == 1).any() and (partial[30:32, 2:38] == 2).any() and partial[20, 35] == 1
    # background: some share of it kept
    assert 0 < (partial == 0).sum() < (mask == 0).sum()
    other = make_partial_mask(mask, spec, sample_rng(0, "img_2"), IGNORE)
    assert not np.array_equal(partial, other)  # another image id draws other background pixels


def test_points_erode_and_scribble_shapes() -> None:
    mask = two_region_mask()
    points = make_partial_mask(mask, PartialLabels(mode="points", points_per_region=3), sample_rng(1, "x"), IGNORE)
    assert (points[5:15, 5:25] == 1).sum() == 3 and (points == 2).sum() == 3
    assert (points == 0).sum() == 3  # one connected background area, no extra share
    eroded = make_partial_mask(mask, PartialLabels(mode="erode", radius=2), sample_rng(1, "x"), IGNORE)
    assert (eroded == 1)[5:15, 5:25].sum() == (10 - 4) * (20 - 4)  # a 10x20 box shrinks by 2 on each side
    scribble = make_partial_mask(mask, PartialLabels(mode="scribble"), sample_rng(1, "x"), IGNORE)
    assert 0 < (scribble == 1).sum() < 40  # a thin stroke, not the 200-pixel blob


def test_partial_labels_config_errors() -> None:
    with pytest.raises(ConfigError, match=r"partial_labels\.mode"):
        PartialLabels(mode="lines")
    with pytest.raises(ConfigError, match="no key"):
        PartialLabels.from_config({"mode": "points", "point": 3})


# ---- label store and DataModule ---------------------------------------------------------------------
def test_label_store_keeps_given_labels_and_round_trips() -> None:
    dataset = SyntheticDefects(num_images=4, image_size=(32, 32), seed=0)
    store = LabelStore(dataset, dataset.train_samples, (32, 32), PartialLabels(mode="points"), share_memory=False)
    store.fill()
    assert store.full is not None and store.labeled_share()["all"] < 0.1
    before = store.given.clone()
    everything_one = torch.ones(2, 32, 32, dtype=torch.long)
    changed = store.update([0, 1], everything_one)
    assert changed > 0
    given = before[:2] != IGNORE
    assert torch.equal(store.current[:2][given], before[:2][given])  # never overwritten
    assert (store.current[:2][~given] == 1).all()
    precision = store.grown_precision()
    expected = float((store.full[:2][~given] == 1).float().mean())
    assert precision["all"] == pytest.approx(expected)
    state = store.state_dict()
    fresh = LabelStore(dataset, dataset.train_samples, (32, 32), PartialLabels(mode="points"), share_memory=False)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.current, store.current)


def test_datamodule_serves_partial_masks_for_labeled_images_only(make_cfg) -> None:
    cfg = make_cfg("method=supervised", "partial_labels=points", "labeled_ratio=0.5")
    datamodule = build_datamodule(cfg, get_class(cfg.method._target_))
    batch, _, _ = next(iter(datamodule.train_dataloader()))
    mask = batch["labeled"]["mask"]
    assert (mask == IGNORE).float().mean() > 0.5 and (mask != IGNORE).any()
    assert "index" in batch["labeled"]
    val = next(iter(datamodule.val_dataloader()))
    assert not (val["mask"] == IGNORE).any()  # evaluation keeps the full masks
    assert "label_store" in datamodule.state_dict()


# ---- the method through its three stages ------------------------------------------------------------
def test_cps_rg_runs_all_three_stages(make_cfg, tmp_path: Path) -> None:
    cfg = make_cfg(
        "method=cps_rg",
        "model=unet",
        "partial_labels=points",
        "labeled_ratio=1.0",  # every training image partially labeled, no unlabeled image
        "++dataset.num_images=24",
        "data.batch_size_labeled=8",
        "trainer.max_steps=8",  # 17 labeled images / 8 = 2 steps per epoch -> epochs 0..3
        "trainer.val_check_interval=4",
        "method.inference=first",
        "callbacks.model_checkpoint.save_top_k=-1",  # keep the step-8 checkpoint whatever its score
        "method.cps_start_epoch=1",
        "method.grow_start_epoch=2",
        "method.growing.threshold=0.0",  # grow wherever the networks' argmax agrees with a neighbour
        "method.growing.neighbourhood=5",
    )
    results = train(cfg)
    assert results["steps"] == 8
    run = Path(cfg.paths.output_dir)
    history = json.loads((run / "grown_labels" / "history.json").read_text())
    assert [entry["stage"] for entry in history] == [1, 2, 3, 3]
    assert history[2]["changed"] > 0
    shares = [entry["labeled_share"]["all"] for entry in history]
    assert shares[0] == shares[1] < shares[2] <= shares[3]
    assert history[2]["grown_precision"]["all"] is not None
    png = Image.open(next((run / "grown_labels" / "epoch_002").glob("*.png")))
    assert png.mode == "P" and png.size == (32, 32)
    # the checkpoint carries the grown labels, and they load into a new DataModule
    saved = [torch.load(path, weights_only=False) for path in (run / "checkpoints").glob("*.ckpt")]
    checkpoint = max(saved, key=lambda c: c["global_step"])
    assert checkpoint["global_step"] == 8
    state = checkpoint["SemiSupervisedDataModule"]["label_store"]
    fresh = instantiate(cfg.data, dataset=instantiate(cfg.dataset.source), use_unlabeled=True, _convert_="all")
    fresh.load_state_dict({"label_store": state})
    assert fresh.label_store.labeled_share()["all"] == pytest.approx(shares[3])
    given = fresh.label_store.given != IGNORE
    assert torch.equal(fresh.label_store.current[given], fresh.label_store.given[given])
    metrics = (run / "csv").rglob("metrics.csv")
    header = next(metrics).read_text().splitlines()[0]
    assert "train/labeled_share/spot" in header and "train/grown_precision/all" in header


def test_cps_rg_rejects_stages_out_of_order(make_cfg, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        train(make_cfg("method=cps_rg", "method.cps_start_epoch=3", "method.grow_start_epoch=1"))
    assert "stages run in order" in capsys.readouterr().err
