"""The self-training family: Inconsistency Masks on hand-made predictions, blanked inputs and ignored
targets, EvalNet filtering, resuming inside a generation, and a two-generation run on synthetic data."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from semiseg.methods.self_training.data import MaskedViewMaker, SelfTrainingSet
from semiseg.methods.self_training.driver import SelfTrainingRun, student_config
from semiseg.methods.self_training.evalnet import (
    EvalNet,
    EvalNetSetting,
    copies_from_scores,
    evalnet_options,
    label_iou,
    official_copies,
    one_hot_labels,
    perturb_mask,
    score_pseudo_labels,
    train_evalnets,
)
from semiseg.methods.self_training.masks import (
    binary_inconsistency_mask,
    inconsistency_mask,
    input_ensemble_probs,
    model_ensemble,
    morph_mask,
    multiclass_inconsistency_mask,
)
from semiseg.methods.self_training.pseudo_label_store import PseudoLabels, pseudo_label_quality
from semiseg.methods.self_training.student import Student
from semiseg.runner import build_module
from semiseg.train import train

TINY_LOOP = [
    "model=im_unet",
    "model.width_multiplier=0.25",
    "method.students_per_generation=2",
    "method.num_teachers=2",
    "trainer.max_steps=2",
    "trainer.val_check_interval=2",
    "callbacks.prediction_overlays.every_n_validations=0",
]


# ---- the mask on hand-made predictions ------------------------------------------------------------------
def test_binary_mask_two_teachers() -> None:
    first = torch.tensor([[0.9, 0.1], [0.8, 0.3]])
    second = torch.tensor([[0.7, 0.2], [0.4, 0.6]])
    labels, mask = binary_inconsistency_mask(torch.stack([first, second])[:, None])
    assert labels[0].tolist() == [[1, 0], [0, 0]]
    assert mask[0].tolist() == [[False, False], [True, True]]


def test_binary_mask_three_teachers_and_softmax_entry() -> None:
    foreground = torch.tensor(
        [
            [[0.9, 0.9, 0.1, 0.6]],
            [[0.8, 0.2, 0.2, 0.7]],
            [[0.6, 0.9, 0.3, 0.4]],
        ]
    )  # (n=3, H=1, W=4): all fg, 2 of 3, none, 2 of 3
    labels, mask = binary_inconsistency_mask(foreground[:, None])
    assert labels[0].tolist() == [[1, 0, 0, 0]]
    assert mask[0].tolist() == [[False, True, False, True]]
    probs = torch.stack([1 - foreground, foreground], dim=1)[:, None]  # (n, B=1, C=2, H, W)
    labels2, mask2 = inconsistency_mask(probs)
    assert torch.equal(labels2, labels) and torch.equal(mask2, mask)


@pytest.mark.parametrize("num_teachers", [2, 3])
def test_multiclass_mask(num_teachers: int) -> None:
    teacher_labels = torch.tensor(
        [
            [[0, 1, 2, 3, 3]],
            [[0, 1, 2, 1, 3]],
            [[0, 1, 3, 3, 3]],
        ]
    )[:num_teachers, None]  # (n, B=1, H=1, W=5)
    labels, mask = multiclass_inconsistency_mask(teacher_labels)
    expected = [False, False, False, True, False] if num_teachers == 2 else [False, False, True, True, False]
    assert mask[0, 0].tolist() == expected
    assert labels[0, 0][~mask[0, 0]].tolist() == [c for c, m in zip([0, 1, 2, 3, 3], expected) if not m]
    # through the softmax entry point: one-hot "probabilities" with 4 classes
    probs = torch.nn.functional.one_hot(teacher_labels, 4).permute(0, 1, 4, 2, 3).float()
    _, mask2 = inconsistency_mask(probs)
    assert torch.equal(mask2, mask)


def test_mask_dilate_and_erode() -> None:
    mask = torch.zeros(1, 7, 7, dtype=torch.bool)
    mask[0, 3, 3] = True
    dilated = morph_mask(mask, dilate_kernel=3)
    assert dilated[0, 2:5, 2:5].all() and int(dilated.sum()) == 9
    assert torch.equal(morph_mask(dilated, erode_kernel=3), mask)
    assert torch.equal(morph_mask(mask), mask)


def test_ensembles_do_not_mask() -> None:
    probs = torch.softmax(torch.randn(3, 2, 4, 8, 8), dim=2)
    labels, mask = model_ensemble(probs)
    assert torch.equal(labels, probs.mean(0).argmax(1)) and not mask.any()
    # input ensemble of a flip-equivariant "network" equals its plain prediction
    conv = torch.nn.Conv2d(3, 4, kernel_size=1)
    image = torch.randn(2, 3, 8, 8)
    assert torch.allclose(input_ensemble_probs(conv, image), conv(image).softmax(1), atol=1e-6)


def test_pseudo_label_quality_ignores_masked_pixels() -> None:
    truth = torch.tensor([[[0, 1, 1, 2]]])
    labels = torch.tensor([[[0, 1, 2, 2]]])
    masks = torch.tensor([[[False, False, True, False]]])
    quality = pseudo_label_quality(labels, masks, truth, num_classes=3, ignore_index=255)
    assert quality["mIoU"] == pytest.approx(1.0) and quality["pixel_acc"] == pytest.approx(1.0)
    quality = pseudo_label_quality(labels, torch.zeros_like(masks), truth, num_classes=3, ignore_index=255)
    assert quality["mIoU"] == pytest.approx((0.5 + 0.5) / 2)


# ---- masked pixels: blank input, no loss ---------------------------------------------------------------
MEAN, STD = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]


@pytest.mark.parametrize("mode", ["black", "zero"])
def test_masked_pixels_are_blank_in_the_input(mode: str) -> None:
    views = MaskedViewMaker(
        image_size=[16, 16],
        mean=MEAN,
        std=STD,
        in_channels=3,
        weak=[{"_target_": "albumentations.HorizontalFlip", "p": 1.0}],
        masked_input=mode,
    )
    image = np.full((16, 16, 3), 200, dtype=np.uint8)
    im = np.zeros((16, 16), dtype=bool)
    im[2:5, 3:9] = True
    out = views.make(image, np.ones((16, 16), dtype=np.int64), im)
    flipped = torch.from_numpy(im[:, ::-1].copy())
    assert torch.equal(out["im"], flipped)
    blank = (0 - 0.5) / 0.25 if mode == "black" else 0.0
    assert torch.allclose(out["image"][:, flipped], torch.tensor(blank))
    assert torch.allclose(out["image"][:, ~flipped], torch.tensor((200 / 255 - 0.5) / 0.25))


def test_pseudo_labeled_items_carry_the_mask_as_ignore(make_cfg) -> None:
    cfg = make_cfg("method=im")
    run = SelfTrainingRun(cfg)
    datamodule = run.datamodule
    unlabeled = datamodule.parts["unlabeled"][:2]
    height, width = datamodule.image_size
    masks = np.zeros((2, height, width), dtype=bool)
    masks[:, :10, :] = True
    pseudo = PseudoLabels(
        ids=[s.id for s in unlabeled],
        labels=np.ones((2, height, width), dtype=np.uint8),
        masks=masks,
        copies=np.array([1, 0]),
        scores=np.array([0.9, 0.1]),
    )
    dataset = SelfTrainingSet(
        datamodule.dataset,
        [],
        datamodule.training_views,
        pseudo=pseudo,
        unlabeled={s.id: s for s in unlabeled},
        im_value=255,
        image_size=(height, width),
    )
    assert len(dataset) == 1  # copies=0 drops the second image
    item = dataset[0]
    assert item["im"].sum() == 10 * width
    assert (item["mask"][item["im"]] == 255).all() and (item["mask"][~item["im"]] == 1).all()


class FixedLogits(torch.nn.Module):
    """Returns the same logits whatever the input, so the loss's gradient per pixel can be read."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.logits[: image.shape[0]]


@pytest.mark.parametrize("im_handling", ["ignore", "class"])
def test_masked_pixels_are_excluded_from_the_loss(make_cfg, tmp_path: Path, im_handling: str) -> None:
    cfg = make_cfg("method=im", f"method.im_handling={im_handling}")
    module = build_module(student_config(cfg, tmp_path, {}))
    assert isinstance(module, Student)
    outputs = module.num_classes + (im_handling == "class")
    logits = torch.randn(2, outputs, 8, 8, requires_grad=True)
    module.net = FixedLogits(logits)  # the loss sees exactly these logits
    im = torch.zeros(2, 8, 8, dtype=torch.bool)
    im[:, :3] = True
    target = torch.randint(0, module.num_classes, (2, 8, 8))
    target[im] = 255 if im_handling == "ignore" else module.num_classes
    loss, terms = module.supervised_loss({"image": torch.zeros(2, 3, 8, 8), "mask": target, "im": im})
    loss.backward()
    per_pixel = logits.grad.abs().sum(1)
    assert (per_pixel[~im] > 0).all()
    if im_handling == "ignore":
        assert (per_pixel[im] == 0).all()
    else:  # the official code's variant: the IM class is trained
        assert (per_pixel[im] > 0).all()
        assert module.predict_logits(torch.zeros(1, 3, 8, 8)).shape[1] == module.num_classes
    assert float(terms["masked_share"]) == pytest.approx(3 / 8)


# ---- the loop -----------------------------------------------------------------------------------------
def test_two_generation_run(make_cfg, tmp_path: Path) -> None:
    results = train(make_cfg("method=im", "method.generations=2", *TINY_LOOP))
    run_dir = tmp_path / "run"
    assert json.loads((run_dir / "results.json").read_text()) == results
    generations = results["generations"]
    assert [g["generation"] for g in generations] == [0, 1, 2]
    assert generations[0]["pseudo_labels"] is None
    for entry in generations[1:]:
        assert len(entry["teachers"]) == 2
        assert 0.0 <= entry["pseudo_label_coverage"] <= 1.0
        assert "mIoU" in entry["pseudo_labels"]["iou_vs_ground_truth"]
        assert (run_dir / f"generation_{entry['generation']}" / "pseudo_labels.npz").is_file()
    for entry in generations:
        assert len(entry["students"]) == 2 and all(s["steps"] == 2 for s in entry["students"])
        assert entry["test/mIoU"] is not None and "val/mIoU" in entry
    assert results["final_student"]["generation"] == 2
    assert results["total_steps"] == 12
    assert 0.0 <= results["metrics"]["test/pixel_acc"] <= 1.0
    pseudo = PseudoLabels.load(run_dir / "generation_1" / "pseudo_labels.npz")
    assert len(pseudo) == results["split"]["unlabeled"]
    table = (run_dir / "generations.csv").read_text().splitlines()
    assert table[0].startswith("generation,best_student,val/mIoU,test/mIoU") and len(table) == 4


def test_resume_in_the_middle_of_a_generation(make_cfg, tmp_path: Path, monkeypatch) -> None:
    overrides = ("method=im", "method.generations=1", *TINY_LOOP, "trainer.max_steps=3")
    overrides = (*overrides, "callbacks.resume_checkpoint.every_n_train_steps=1")  # last.ckpt at every step
    original_step = Student.training_step

    def crashing_step(self, batch, batch_idx):
        if "generation_1/student_1" in str(self.trainer.default_root_dir) and self.global_step == 2:
            raise RuntimeError("simulated interruption")
        return original_step(self, batch, batch_idx)

    monkeypatch.setattr(Student, "training_step", crashing_step)
    with pytest.raises(RuntimeError, match="simulated interruption"):
        train(make_cfg(*overrides))
    run_dir = tmp_path / "run"
    done = [run_dir / "generation_0" / f"student_{j}" / "student.json" for j in (0, 1)]
    done.append(run_dir / "generation_1" / "student_0" / "student.json")
    stamps = [path.stat().st_mtime_ns for path in done]
    assert not (run_dir / "generation_1" / "student_1" / "student.json").exists()
    assert (run_dir / "generation_1" / "student_1" / "checkpoints" / "last.ckpt").is_file()
    pseudo_stamp = (run_dir / "generation_1" / "pseudo_labels.npz").stat().st_mtime_ns

    monkeypatch.setattr(Student, "training_step", original_step)
    results = train(make_cfg(*overrides))
    assert [path.stat().st_mtime_ns for path in done] == stamps  # finished students are not retrained
    assert (run_dir / "generation_1" / "pseudo_labels.npz").stat().st_mtime_ns == pseudo_stamp
    record = json.loads((run_dir / "generation_1" / "student_1" / "student.json").read_text())
    assert record["resumed_from"] == "generation_1/student_1/checkpoints/last.ckpt"
    assert record["steps"] == 3
    assert len(results["generations"]) == 2


# ---- the paper's U-Net --------------------------------------------------------------------------------
@pytest.mark.parametrize(("alpha", "expected"), [(0.5, 170_818), (2.0, 2_714_626)])
def test_im_unet_size_and_shape(alpha: float, expected: int) -> None:
    from semiseg.models.base import count_trainable_parameters
    from semiseg.models.im_unet import IMUNet

    network = IMUNet(in_channels=3, num_classes=2, width_multiplier=alpha)
    # trainable parameters; Keras also counts the BatchNorm running statistics (the paper's 0.17 M / 2.72 M)
    assert count_trainable_parameters(network) == expected
    batch_norm_statistics = sum(2 * m.num_features for m in network.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert round((expected + batch_norm_statistics) / 1e6, 2) == (0.17 if alpha == 0.5 else 2.72)
    assert network(torch.zeros(2, 3, 32, 48)).shape == (2, 2, 32, 48)
    assert len(network.encode(torch.zeros(1, 3, 32, 32))) == 5


# ---- EvalNet ------------------------------------------------------------------------------------------
class MeanScore(torch.nn.Module):
    """A stand-in scorer with a known output: the mean of the image (one score per image)."""

    def forward(self, image: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        assert labels.shape[1] == 3 and image.shape[0] == labels.shape[0]
        return image.mean(dim=(1, 2, 3))


def test_evalnet_filter_keeps_exactly_the_samples_above_the_threshold() -> None:
    scores_wanted = np.array([0.2, 0.75, 0.76, 0.9, 1.0, 0.74])
    count = len(scores_wanted)
    pseudo = PseudoLabels(
        ids=[f"u{i}" for i in range(count)],
        labels=np.zeros((count, 4, 4), dtype=np.uint8),
        masks=np.zeros((count, 4, 4), dtype=bool),
        copies=np.ones(count, dtype=np.int64),
        scores=np.full(count, np.nan),
    )
    images = torch.tensor(scores_wanted, dtype=torch.float32)[:, None, None, None].expand(count, 3, 4, 4)
    batches = [(pseudo.ids[:4], images[:4]), (pseudo.ids[4:], images[4:])]
    scores = score_pseudo_labels(MeanScore(), batches, pseudo, num_classes=3)
    assert np.allclose(scores, scores_wanted)
    copies = copies_from_scores(scores, threshold=0.75)
    assert (copies > 0).tolist() == [False, False, True, True, True, False]
    assert set(copies.tolist()) <= {0, 1}
    with_extra = copies_from_scores(scores, threshold=0.75, max_extra_copies=4)
    assert with_extra.tolist() == [0, 0, 1, 3, 5, 0]


def test_evalnet_network_and_training_targets() -> None:
    network = EvalNet(in_channels=3, num_classes=4, width_multiplier=0.25)
    labels = one_hot_labels(torch.randint(0, 4, (2, 32, 32)), torch.zeros(2, 32, 32, dtype=torch.bool), 4)
    score = network(torch.randn(2, 3, 32, 32), labels)
    assert score.shape == (2,) and ((score >= 0) & (score <= 1)).all()
    truth = np.zeros((32, 32), dtype=np.int64)
    truth[8:16, 8:16] = 2
    assert label_iou(truth, truth, 4, 255) == 1.0
    shifted = np.roll(truth, 4, axis=1)
    assert label_iou(shifted, truth, 4, 255) == pytest.approx(32 / 96)
    rng = np.random.default_rng(0)
    damaged = [label_iou(perturb_mask(truth, rng, 4, 255, prob=1.0), truth, 4, 255) for _ in range(10)]
    assert all(0.0 <= d <= 1.0 for d in damaged) and min(damaged) < 1.0


def test_im_plusplus_run_filters_with_evalnet(make_cfg, tmp_path: Path) -> None:
    """The official scheme: EvalNets trained on the LDT students' predictions, the best by validation MAE
    score, and every kept pseudo-label enters 1..5 times (none dropped by EvalNet)."""
    overrides = ["method=im_plusplus", "method.generations=1", "method.evalnet.max_steps=2",
                 "method.evalnet.num_evalnets=3", "method.evalnet.ensemble_size=2", "method.evalnet.num_loops=2",
                 "method.evalnet.num_loops_val=1", "method.evalnet.max_models=2"]  # fmt: skip
    results = train(make_cfg(*overrides, *TINY_LOOP))
    entry = results["generations"][1]
    evalnet = entry["pseudo_labels"]["evalnet"]
    pseudo = PseudoLabels.load(tmp_path / "run" / "generation_1" / "pseudo_labels.npz")
    summary = json.loads((tmp_path / "run" / "evalnet" / "evalnet.json").read_text())
    assert len(summary["val_mae"]) == 3 and evalnet["ensemble_size"] == 2
    assert summary["ensemble"] == sorted(range(3), key=lambda i: summary["val_mae"][i])[:2]
    assert all((tmp_path / "run" / "evalnet" / f"model_{i}.pt").is_file() for i in range(3))
    assert not np.isnan(pseudo.scores).any()
    wanted = official_copies(pseudo.scores, 0.72, 0.75, 5)
    kept = pseudo.copies > 0
    assert (pseudo.copies[kept] == wanted[kept]).all() and evalnet["kept"] == int(kept.sum())
    widths = [s["num_params"] for s in entry["students"]]
    assert widths[0] > results["generations"][0]["students"][0]["num_params"]  # Noisy Student grows


def test_training_evalnets_leaves_the_global_random_generators_as_they_were(make_cfg, tmp_path: Path) -> None:
    """Trained here or reloaded by a resumed run, EvalNets leave the run's random streams alike."""
    run = SelfTrainingRun(make_cfg("method=im_plusplus"))
    setting = EvalNetSetting(
        folder=tmp_path / "evalnet", datamodule=run.datamodule, in_channels=3, num_classes=2, ignore_index=255,
        fast_dev_run=True,
    )  # fmt: skip
    options = evalnet_options({"training_data": "perturbed_truth", "max_steps": 1, "num_evalnets": 2})

    def draws() -> tuple[float, float, float]:
        return float(torch.rand(())), float(np.random.rand()), random.random()

    for reloaded in (False, True):  # the second call finds model_<i>.pt and evalnet.json
        torch.manual_seed(5), np.random.seed(5), random.seed(5)
        expected = draws()
        torch.manual_seed(5), np.random.seed(5), random.seed(5)
        train_evalnets(setting, options)
        assert draws() == expected, f"reloaded={reloaded}"
    assert (tmp_path / "evalnet" / "evalnet.json").is_file()


def test_evalnet_threshold_rule_drops_low_scores(make_cfg, tmp_path: Path) -> None:
    overrides = ["method=im_plusplus", "method.generations=1", "method.evalnet.max_steps=2",
                 "method.evalnet.copy_rule=threshold", "method.evalnet.training_data=perturbed_truth",
                 "method.evalnet.num_evalnets=1", "method.evalnet.ensemble_size=1"]  # fmt: skip
    results = train(make_cfg(*overrides, *TINY_LOOP))
    evalnet = results["generations"][1]["pseudo_labels"]["evalnet"]
    pseudo = PseudoLabels.load(tmp_path / "run" / "generation_1" / "pseudo_labels.npz")
    assert evalnet["kept"] == int((pseudo.scores > 0.75).sum()) == results["generations"][1]["pseudo_labels"]["kept"]


def test_aldt_adds_augmented_copies_of_every_labeled_image(make_cfg) -> None:
    run = SelfTrainingRun(make_cfg("method=aldt"))
    datamodule = run.datamodule
    training_set = datamodule.training_set()
    labeled = len(datamodule.parts["labeled"])
    assert len(training_set) == labeled * 10
    assert sorted({entry.copy for entry in training_set.entries}) == list(range(10))
    item = training_set[0]
    assert set(item) == {"image", "mask", "im", "id"} and not item["im"].any()
