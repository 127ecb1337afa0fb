"""The Inconsistency Masks code's offline copies (Noisy Student / IM+ / IM++), EvalNet's training samples from
the LDT students' predictions, and its scoring of blacked-out pseudo-labels, on hand-computed cases."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from semiseg.errors import ConfigError
from semiseg.methods.self_training.data import SelfTrainingSet
from semiseg.methods.self_training.driver import SelfTrainingRun, student_config
from semiseg.methods.self_training.evalnet import (
    EVALNET_DEFAULTS,
    label_iou,
    ldt_sample,
    ldt_votes,
    score_pseudo_labels,
)
from semiseg.methods.self_training.masks import (
    RANDOM_VIEW_GEOMETRIES,
    random_view_labels,
    undo_geometry,
    vote_of_views,
)
from semiseg.methods.self_training.offline_augment import (
    OFFICIAL_NOISY_STUDENT,
    PhotometricNoise,
    apply_geometry,
    augment_with_masks,
    blur_and_noise,
    brightness,
    offline_copy_noise,
)
from semiseg.methods.self_training.pseudo_label_store import PseudoLabels
from semiseg.methods.self_training.student import ConsistencyStudent
from semiseg.runner import build_module

GEOMETRY_ONLY = PhotometricNoise(max_blur=0, max_noise=0, brightness_prob=0.0)


def positions(height: int, width: int) -> np.ndarray:
    """An image whose every pixel is distinct: ``(H, W, 1)`` uint8."""
    return np.arange(height * width, dtype=np.uint8).reshape(height, width, 1)


# ---- one augmentation ------------------------------------------------------------------------------------
def test_geometry_moves_image_and_masks_alike_and_draws_all_eight() -> None:
    image = positions(6, 6)
    seen = set()
    for seed in range(64):
        moved, (label, blocked) = augment_with_masks(
            image, [image[:, :, 0].astype(np.int64), (image[:, :, 0] % 2).astype(np.uint8)], GEOMETRY_ONLY,
            np.random.default_rng(seed),
        )  # fmt: skip
        assert moved.shape == image.shape and moved.dtype == np.uint8
        assert (moved[:, :, 0] == label).all() and (blocked == label % 2).all()
        seen.add(moved.tobytes())
    assert len(seen) == 8  # the dihedral group of the square: flips and quarter turns


def test_non_square_copies_keep_their_shape_and_no_rotation_without_free_rotation() -> None:
    image = positions(4, 6)
    for seed in range(32):
        moved, _ = augment_with_masks(image, [], GEOMETRY_ONLY, np.random.default_rng(seed))
        assert moved.shape == (4, 6, 1)
    square = positions(6, 6)
    fixed = PhotometricNoise(max_blur=0, max_noise=0, brightness_prob=0.0, free_rotation=False)
    copies = {augment_with_masks(square, [], fixed, np.random.default_rng(s))[0].tobytes() for s in range(32)}
    assert copies == {square.tobytes(), square[:, ::-1].tobytes()}  # horizontal flips only, as officially


def test_brightness_is_saturated_absolute_affine() -> None:
    image = np.array([[3, 100, 200]], dtype=np.uint8)[:, :, None]
    noise = PhotometricNoise(brightness_alpha=(2.0, 2.0), brightness_beta=(-10.0, -10.0), brightness_prob=1.0)
    out = brightness(image, noise, np.random.default_rng(0))
    assert out[0, :, 0].tolist() == [4, 190, 255]  # |2*3-10| = 4, 2*100-10, 2*200-10 saturated
    never = PhotometricNoise(brightness_alpha=(2.0, 2.0), brightness_prob=0.0)
    assert (brightness(image, never, np.random.default_rng(0)) == image).all()


def test_noise_is_integer_uniform_in_its_half_open_range_and_no_blur_at_level_0() -> None:
    image = np.full((64, 64, 1), 128, dtype=np.uint8)
    out = blur_and_noise(image, max_blur=0, max_noise=5, rng=np.random.default_rng(0)).astype(int) - 128
    assert out.min() == -5 and out.max() == 4  # randint(-5, 5): 5 is never drawn
    clean = blur_and_noise(image, max_blur=0, max_noise=0, rng=np.random.default_rng(0))
    assert (clean == image).all()
    edge = np.zeros((9, 9, 1), dtype=np.uint8)
    edge[:, 4:] = 255
    blurred = {blur_and_noise(edge, 3, 0, np.random.default_rng(s)).tobytes() for s in range(40)}
    assert len(blurred) == 4  # none, 3x3, 5x5, 7x7


def test_offline_copy_tables_by_generation() -> None:
    first = offline_copy_noise(OFFICIAL_NOISY_STUDENT, 1)
    assert (first.max_blur, first.max_noise) == (0, 5)
    assert (first.brightness_alpha, first.brightness_beta) == ((0.9, 1.1), (-5.0, 5.0))
    assert offline_copy_noise(OFFICIAL_NOISY_STUDENT, 5).max_noise == 25
    assert offline_copy_noise(OFFICIAL_NOISY_STUDENT, 9).max_blur == 3  # later generations: the last entry
    with pytest.raises(ConfigError, match=r"method\.offline_copy has no key"):
        offline_copy_noise({"max_noize": [5]}, 1)
    with pytest.raises(ConfigError, match="max_blur=4"):
        offline_copy_noise({"max_blur": [4]}, 1)


# ---- the offline copies in the student's training set ------------------------------------------------------
def test_pseudo_labeled_items_are_fixed_offline_copies(make_cfg, monkeypatch) -> None:
    run = SelfTrainingRun(make_cfg("method=noisy_student"))
    datamodule = run.datamodule
    unlabeled = datamodule.parts["unlabeled"][:3]
    height, width = datamodule.image_size
    labels = np.zeros((3, height, width), dtype=np.uint8)
    labels[:, : height // 2] = 1
    pseudo = PseudoLabels([s.id for s in unlabeled], labels, np.zeros_like(labels, dtype=bool),
                          np.array([1, 2, 1]), np.full(3, np.nan))  # fmt: skip
    noise = offline_copy_noise(OFFICIAL_NOISY_STUDENT, 2)
    datamodule.set_pseudo_labels(pseudo, offline_noise=noise, generation=2, offline_seed=5)
    training_set = datamodule.training_set()
    entries = [e for e in training_set.entries if e.pseudo_row is not None]
    assert len(entries) == 4
    image = datamodule.dataset.load_image(unlabeled[1])
    import cv2

    image = cv2.resize(image, (width, height)).reshape(height, width, -1)
    im = np.zeros((height, width), dtype=bool)
    first = training_set.offline_copy(image, im, labels[1].astype(np.int64), entries[1])
    again = training_set.offline_copy(image, im, labels[1].astype(np.int64), entries[1])
    other_copy = training_set.offline_copy(image, im, labels[1].astype(np.int64), entries[2])
    assert all((a == b).all() for a, b in zip(first, again, strict=True))  # the same copy every epoch
    assert not (first[0] == other_copy[0]).all()  # each copy its own draw
    assert not (first[0] == image).all()  # noise of generation 2 (up to 10 grey levels)
    calls: list[tuple[int | None, int]] = []
    original = SelfTrainingSet.offline_copy

    def spy(self, image, im, label, entry):  # type: ignore[no-untyped-def]
        calls.append((entry.pseudo_row, entry.copy))
        return original(self, image, im, label, entry)

    monkeypatch.setattr(SelfTrainingSet, "offline_copy", spy)
    for index in range(len(training_set)):
        training_set[index]
    assert sorted(calls) == [(0, 0), (1, 0), (1, 1), (2, 0)]  # every pseudo-labeled item, no labeled one


def test_noisy_student_generation_uses_its_table(make_cfg) -> None:
    cfg = make_cfg("method=noisy_student", "method.generations=1", "model=im_unet", "model.width_multiplier=0.25",
                   "method.students_per_generation=1", "trainer.max_steps=1", "trainer.val_check_interval=1",
                   "callbacks.prediction_overlays.every_n_validations=0")  # fmt: skip
    run = SelfTrainingRun(cfg)
    run.run()
    assert run.datamodule.offline_noise == offline_copy_noise(OFFICIAL_NOISY_STUDENT, 1)
    assert run.datamodule.training_set().offline_noise is not None


def test_bad_offline_table_is_refused_before_training(make_cfg) -> None:
    with pytest.raises(ConfigError, match="max_noise"):
        SelfTrainingRun(make_cfg("method=noisy_student", "method.offline_copy.max_noise=[5,-1]"))


# ---- EvalNet samples from the LDT students' predictions ----------------------------------------------------
def test_ldt_sample_by_hand() -> None:
    truth = np.zeros((4, 4), dtype=np.int64)
    truth[:2, :2] = 1  # 4 defect pixels
    first = truth.copy()
    first[0, 2] = 1  # one extra pixel
    second = truth.copy()
    second[1, 1] = 0  # one pixel missed
    votes = np.stack([first, second]).astype(np.uint8)
    image = np.full((4, 4, 1), 90, dtype=np.uint8)
    options = {**EVALNET_DEFAULTS, "min_models": 2, "max_models": 2, "morph_kernels": [0], "augment_prob": 0.0}
    picture, label, target = ldt_sample(image, truth, votes, np.random.default_rng(0), options, 2, 255, 0)
    masked = np.zeros((4, 4), dtype=bool)
    masked[0, 2] = masked[1, 1] = True  # where the two students disagree
    assert (picture[:, :, 0] == np.where(masked, 0, 90)).all()
    assert (label == np.where(masked, 255, truth)).all()
    assert target == pytest.approx(3 / 4)  # masked pixels count as background: 3 of the 4 true pixels found
    empty = np.zeros((2, 4, 4), dtype=np.uint8)
    assert ldt_sample(image, np.zeros((4, 4), np.int64), empty, np.random.default_rng(0), options, 2, 255)[2] == 0.0


def test_ldt_sample_draws_2_to_4_students_and_morph_kernels() -> None:
    rng = np.random.default_rng(1)
    votes = np.zeros((5, 8, 8), dtype=np.uint8)
    for model in range(5):
        votes[model, model, model] = 1  # every student alone on one pixel
    options = {**EVALNET_DEFAULTS, "morph_kernels": [0], "augment_prob": 0.0}
    counts = set()
    for _ in range(60):
        _, label, _ = ldt_sample(np.zeros((8, 8, 1), np.uint8), np.zeros((8, 8), np.int64), votes, rng, options, 2, 255)
        counts.add(int((label == 255).sum()))  # each drawn student adds one disagreeing pixel
    assert counts == {2, 3, 4}
    wide = {**options, "morph_kernels": [3], "min_models": 2, "max_models": 2}
    _, label, _ = ldt_sample(np.zeros((8, 8, 1), np.uint8), np.zeros((8, 8), np.int64), votes[:2], rng, wide, 2, 255)
    assert (label == 255).sum() == 0  # a 3x3 erosion removes single pixels before the dilation


def test_scoring_blacks_out_masked_pixels() -> None:
    class MeanScore(torch.nn.Module):
        def forward(self, image: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            return image.mean(dim=(1, 2, 3))

    masks = np.zeros((1, 2, 2), dtype=bool)
    masks[0, 0, 0] = True
    pseudo = PseudoLabels(["a"], np.zeros((1, 2, 2), np.uint8), masks, np.ones(1, np.int64), np.full(1, np.nan))
    image = torch.ones(1, 1, 2, 2)
    plain = score_pseudo_labels(MeanScore(), [(["a"], image)], pseudo, 2)
    blacked = score_pseudo_labels(MeanScore(), [(["a"], image)], pseudo, 2, black=torch.tensor([-3.0]))
    assert plain[0] == pytest.approx(1.0) and blacked[0] == pytest.approx((3 - 3) / 4)
    assert label_iou(np.zeros((2, 2)), np.zeros((2, 2)), 2, 255) == 0.0


# ---- the official random input ensemble ---------------------------------------------------------------------
def test_undo_geometry_inverts_every_view() -> None:
    square, wide = positions(5, 5)[:, :, 0], positions(4, 6)[:, :, 0]
    for vertical, horizontal, turns in RANDOM_VIEW_GEOMETRIES:
        assert (undo_geometry(apply_geometry(square, vertical, horizontal, turns), vertical, horizontal, turns)
                == square).all()  # fmt: skip
        if turns == 2:
            assert (undo_geometry(apply_geometry(wide, vertical, horizontal, 2), vertical, horizontal, 2) == wide).all()


def test_vote_of_views_binary_unanimous_multiclass_majority() -> None:
    binary = np.array([[[1, 1, 0]], [[1, 0, 0]], [[1, 1, 0]]])
    assert vote_of_views(binary, 2).tolist() == [[1, 0, 0]]
    multi = np.array([[[2, 1, 3]], [[2, 3, 1]], [[1, 3, 0]]])
    assert vote_of_views(multi, 4).tolist() == [[2, 3, 0]]  # last pixel: a three-way tie goes to the lowest label


def bright_is_defect(image: torch.Tensor) -> torch.Tensor:
    """A stand-in teacher: class 1 where the first channel's normalised value is above 0."""
    foreground = (image[:, :1] > 0).float() * 8.0 - 4.0
    return torch.cat([-foreground, foreground], dim=1)


def test_random_views_are_mapped_back() -> None:
    image = np.zeros((6, 6, 1), dtype=np.uint8)
    image[0, :4] = image[1:4, 0] = 255  # an L shape: every flip or turn moves it

    def normalise(picture: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(picture).permute(2, 0, 1).float() / 255.0 - 0.5

    clean = PhotometricNoise(max_blur=0, max_noise=0, brightness_prob=0.0)
    for seed in range(5):
        label = random_view_labels(bright_is_defect, image, normalise, clean, 7, np.random.default_rng(seed))
        assert (label == (image[:, :, 0] > 0)).all()
    noisy = PhotometricNoise(max_blur=0, max_noise=0, brightness_alpha=(0.0, 0.0), brightness_prob=1.0)
    assert random_view_labels(bright_is_defect, image, normalise, noisy, 3, np.random.default_rng(0)).sum() == 0


def test_input_ensemble_run_labels_through_random_views(make_cfg) -> None:
    run = SelfTrainingRun(make_cfg("method=input_ensemble", "method.input_ensemble.num_views=3"))

    class Teacher:
        predict_logits = staticmethod(bright_is_defect)

    pseudo = run.label_unlabeled([Teacher()], generation=1)  # type: ignore[list-item]
    assert len(pseudo) == len(run.datamodule.parts["unlabeled"]) and not pseudo.masks.any()
    again = run.label_unlabeled([Teacher()], generation=1)  # type: ignore[list-item]
    assert (pseudo.labels == again.labels).all()  # reproducible from the run's seed and the generation
    dihedral = SelfTrainingRun(make_cfg("method=input_ensemble", "method.input_ensemble.mode=dihedral"))
    plain = dihedral.label_unlabeled([Teacher()], generation=1)  # type: ignore[list-item]
    assert not (plain.labels == pseudo.labels).all()  # the random views' noise and unanimity change labels


def test_denormalise_recovers_the_evaluation_images(make_cfg) -> None:
    run = SelfTrainingRun(make_cfg("method=input_ensemble"))
    datamodule = run.datamodule
    sample = datamodule.parts["unlabeled"][0]
    image, _ = datamodule.dataset.load(sample)
    resized = np.asarray(datamodule.eval_views.geometry(image=image)["image"])
    tensor = datamodule.eval_views._tensor(resized)[None]
    assert (datamodule.denormalise(tensor)[0] == resized.reshape(datamodule.denormalise(tensor)[0].shape)).all()


# ---- the official Consistency Loss: fine-tune the best LDT student in alternating passes --------------------
def consistency_module(make_cfg, tmp_path, *overrides: str) -> ConsistencyStudent:  # type: ignore[no-untyped-def]
    cfg = make_cfg("method=consistency_loss", "model=im_unet", "model.width_multiplier=0.25", *overrides)
    return build_module(student_config(cfg, tmp_path / "student", {}))


def test_alternating_passes_use_one_loss_each(make_cfg, tmp_path, monkeypatch) -> None:
    module = consistency_module(make_cfg, tmp_path)
    assert isinstance(module, ConsistencyStudent) and module.schedule == "alternating"
    module.cycle = (2, 3)
    step = [0]
    monkeypatch.setattr(ConsistencyStudent, "global_step", property(lambda self: step[0]))
    labeled = {"image": torch.randn(2, 3, 32, 32), "mask": torch.randint(0, 2, (2, 32, 32))}
    unlabeled = {key: torch.randn(2, 3, 32, 32) for key in ("image", "image_strong", "image_strong2")}
    phases = []
    for step[0] in range(7):
        _, terms = module.training_losses(labeled, unlabeled)
        phases.append(int(terms["consistency_phase"]))
        assert ("loss_sup" in terms) != ("loss_unsup" in terms)  # one loss per step, never both
    assert phases == [0, 0, 1, 1, 1, 0, 0]


def test_consistency_views_pick_the_two_strong_copies(make_cfg, tmp_path) -> None:
    module = consistency_module(make_cfg, tmp_path).eval()
    same = torch.randn(2, 3, 32, 32)
    batch = {"image": torch.randn(2, 3, 32, 32), "image_strong": same, "image_strong2": same.clone()}
    assert float(module.unsupervised_loss(batch, {})[0]) == 0.0  # strong_strong: the two strong copies agree
    module.views = "weak_strong"
    assert float(module.unsupervised_loss(batch, {})[0]) > 0.0


def test_init_weights_are_loaded_when_fitting_starts(make_cfg, tmp_path) -> None:
    source = consistency_module(make_cfg, tmp_path)
    path = tmp_path / "model.pt"
    torch.save(source.state_dict(), path)
    target = consistency_module(make_cfg, tmp_path, f"+method.init_weights={path}")
    assert not all(torch.equal(a, b) for a, b in zip(source.parameters(), target.parameters(), strict=True))
    target.setup("fit")
    assert all(torch.equal(a, b) for a, b in zip(source.parameters(), target.parameters(), strict=True))
    with pytest.raises(Exception, match="no such file"):  # a ConfigError, wrapped by Hydra's instantiate
        consistency_module(make_cfg, tmp_path, f"+method.init_weights={tmp_path / 'missing.pt'}")


def test_consistency_run_finetunes_the_best_ldt_student(make_cfg, tmp_path) -> None:
    cfg = make_cfg("method=consistency_loss", "model=im_unet", "model.width_multiplier=0.25",
                   "method.students_per_generation=2", "trainer.max_steps=2", "trainer.val_check_interval=2",
                   "callbacks.prediction_overlays.every_n_validations=0")  # fmt: skip
    run = SelfTrainingRun(cfg)
    results = run.run()
    assert [g["pseudo_labels"] for g in results["generations"]] == [None, None]  # no pseudo-labels
    best = results["generations"][0]["best_student"]
    for index in range(2):
        record = json.loads((tmp_path / "run" / "generation_1" / f"student_{index}" / "student.json").read_text())
        assert record["method_overrides"]["init_weights"].endswith(f"generation_0/student_{best}/model.pt")
    first = json.loads((tmp_path / "run" / "generation_0" / "student_0" / "student.json").read_text())
    assert first["method_overrides"] == {"consistency_weight": 0.0}


def test_ldt_votes_batch_the_images_and_give_each_image_its_own_labels() -> None:
    """Five images in passes of at most two: every predictor's hard labels, as one image at a time gives them."""
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (6, 5, 3), dtype=np.uint8) for _ in range(5)]
    batch_sizes: list[int] = []

    def normalise(image: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(image).permute(2, 0, 1).float() / 255

    def first_channel_wins(x: torch.Tensor) -> torch.Tensor:  # 3 classes: argmax of the channels
        batch_sizes.append(x.shape[0])
        return x

    def brighter_than_half(x: torch.Tensor) -> torch.Tensor:  # binary: foreground where the mean is > 0.5
        mean = x.mean(dim=1, keepdim=True)
        return torch.cat([torch.zeros_like(mean), (mean - 0.5) * 100], dim=1)

    votes = ldt_votes([first_channel_wins, brighter_than_half], images, normalise, batch_size=2)
    assert votes.shape == (2, 5, 6, 5) and votes.dtype == np.uint8
    assert batch_sizes == [2, 2, 1]
    for index, image in enumerate(images):
        assert (votes[0, index] == image.argmax(axis=2)).all()
        assert (votes[1, index] == (image.astype(float).mean(axis=2) / 255 > 0.5)).all()


@pytest.mark.parametrize(("views", "expected"), [
    ("weak_strong", ("image", "image_strong")),
    ("strong_strong", ("image", "image_strong", "image_strong2")),
])  # fmt: skip
def test_consistency_student_asks_only_for_the_views_its_loss_reads(make_cfg, views: str, expected: tuple) -> None:
    run = SelfTrainingRun(make_cfg("method=consistency_loss", f"method.views={views}"))
    assert ConsistencyStudent.views_for(run.cfg.method) == expected
    assert run.datamodule.unlabeled_views.views == expected
    item = run.datamodule.part_dataset("unlabeled")[0]
    assert {key for key in item if key.startswith("image")} == set(expected)
