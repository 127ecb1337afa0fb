"""Fidelity to the official code: every option that reproduces an official variant, pinned on a small
hand-computed case (docs/fidelity.md lists them all)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from conftest import compose_config
from data.make_fake_datasets import make_fake_dagm
from semiseg.config import CONFIG_DIR
from semiseg.data.datasets.base import Sample
from semiseg.data.datasets.dagm import DAGM2007
from semiseg.data.split import PARTS, Split, check_split_ids, make_split
from semiseg.errors import ConfigError
from semiseg.methods.cct import CCT
from semiseg.methods.consistency import masked_mean, softmax_mse
from semiseg.methods.self_training.driver import LoopOptions, masked_label_value, student_config
from semiseg.methods.self_training.evalnet import copies_from_scores, label_iou, official_copies
from semiseg.methods.self_training.masks import filter_bad_predictions, inconsistency_mask, model_ensemble, morph_mask
from semiseg.models.perturbations import FeatureDropout
from semiseg.runner import build_module

# ---- UAPS per-dataset settings (djene-mengistu/UAPS, one training script per dataset) --------------------
# dataset -> (ramp unit: iter_num // unit, T, lr, batch per loader, steps per epoch = iter_per_epoch - 1)
OFFICIAL_UAPS = {
    "neu": (80, 200, 1e-3, 16, 59),  # UAPS_train.py, utilities/dataloaders.py
    "dagm": (60, 200, 1e-3, 16, 29),  # DAGM-Dataset-codes
    "mtiles": (50, 200, 2e-3, 16, 19),  # MTiles-Dataset-codes
    "kosdd2": (40, 150, 2e-3, 12, 19),  # KoSDD2-Dataset-Codes
}
OFFICIAL_EPOCHS = 799  # for epoch in range(1, 800)


@pytest.mark.parametrize("dataset", sorted(OFFICIAL_UAPS))
def test_uaps_presets_use_each_official_script_s_schedule(dataset: str) -> None:
    unit, length, lr, batch, steps_per_epoch = OFFICIAL_UAPS[dataset]
    cfg = compose_config([f"experiment=uaps_{dataset}"], fast=False)
    assert cfg.dataset.name == dataset and cfg.method.name == "uaps"
    assert (cfg.method.rampup_unit_steps, cfg.method.rampup_length) == (unit, length)
    assert cfg.optimizer.lr == lr
    assert (cfg.data.batch_size_labeled, cfg.data.batch_size_unlabeled) == (batch, batch)
    assert cfg.trainer.val_check_interval == steps_per_epoch
    assert cfg.trainer.max_steps == OFFICIAL_EPOCHS * steps_per_epoch
    assert cfg.scheduler.scheduler.patience == 50 and cfg.evaluation.monitor == "val/mDice"
    assert cfg.data.test_on_val is False  # the clean split is the default
    assert cfg.method.uncertainty_weighting == "pixel"  # the paper


@pytest.mark.parametrize("dataset", sorted(OFFICIAL_UAPS))
def test_uaps_official_presets_switch_to_the_code_s_variants(dataset: str) -> None:
    cfg = compose_config([f"experiment=uaps_{dataset}_official"], fast=False)
    assert cfg.method.uncertainty_weighting == "batch"
    assert cfg.method.rampup_unit_steps == OFFICIAL_UAPS[dataset][0]
    assert cfg.data.test_on_val is (dataset == "mtiles")
    assert cfg.dataset.source.get("official_test", True) is (dataset != "dagm")
    if dataset == "mtiles":  # loss = sup + w(t) * ps + l_uncert
        assert (cfg.method.un_coefficient, cfg.method.un_rampup) == (1.0, False)


def test_budget_cpu_overlays_any_preset() -> None:
    for dataset, size in (("neu", [128, 128]), ("kosdd2", [256, 128])):
        cfg = compose_config([f"experiment=uaps_{dataset}", "budget=cpu"], fast=False)
        assert list(cfg.dataset.image_size) == size
        assert (cfg.data.batch_size_labeled, cfg.trainer.max_steps, cfg.trainer.val_check_interval) == (4, 300, 50)
        assert cfg.scheduler is None  # also drops the KolektorSDD2 preset's min_lr
        assert (cfg.method.rampup_length, cfg.method.rampup_unit_steps) == (150, 1)
        assert cfg.optimizer.lr == OFFICIAL_UAPS[dataset][2]  # the preset's other settings stay
    plain = compose_config(["method=cct", "budget=cpu"], fast=False)
    assert plain.method.weight == 30.0  # a budget touches no method's weights


def test_protocol_is_declared_once_and_papers_by_default() -> None:
    papers = {m: compose_config([f"method={m}"], fast=False).method for m in ("cct", "cps", "ucc", "uaps")}
    assert papers["cct"].weight == 30.0 and papers["cps"].weight == 1.5 and papers["cps"].pseudo_loss == "ce"
    assert papers["ucc"].pseudo_loss == "ce" and papers["uaps"].rampup_unit_steps == 80
    for method, key, value in (
        ("cps", "pseudo_loss", "ce_dice"),
        ("ucc", "pseudo_loss", "ce_dice"),
        ("cct", "weight", 0.1),
        ("uaps", "rampup_unit_steps", 150),
    ):
        assert compose_config([f"method={method}", "protocol=uaps"], fast=False).method[key] == value
        assert compose_config(["experiment=comparison", f"method={method}"], fast=False).method[key] == value


# ---- official splits -------------------------------------------------------------------------------------
def test_test_on_val_validates_on_the_test_part_and_reloads() -> None:
    # 10 images of one class: test = 20 % = 2 images, then val = those 2, the other 8 are training images
    samples = [Sample(id=f"i{k}", image=k, mask=k, classes=frozenset({1})) for k in range(10)]
    split = make_split(samples, None, 0.5, 0, val_fraction=0.1, test_fraction=0.2, test_on_val=True)
    assert split.val == split.test and len(split.test) == 2
    assert split.meta["test_on_val"] is True and split.meta["val_fraction"] is None  # recorded in split.json
    assert len(split.labeled) + len(split.unlabeled) == 8
    assert not set(split.test) & set(split.labeled + split.unlabeled)
    check_split_ids(split, {s.id for s in samples}, "test")  # accepted: the split says val is the test part
    clean = make_split(samples, None, 0.5, 0, val_fraction=0.1, test_fraction=0.2)
    assert not set(clean.val) & set(clean.test) and len(clean.labeled) + len(clean.unlabeled) == 7
    forged = Split(**{p: getattr(split, p) for p in PARTS})  # the same lists without the declaration
    with pytest.raises(Exception, match="in both"):
        check_split_ids(forged, {s.id for s in samples}, "test")


def test_dagm_official_test_false_leaves_the_test_folders_out(tmp_path: Path) -> None:
    root = make_fake_dagm(tmp_path / "DAGM_data")
    assert len(DAGM2007(root).test_samples) == 6 * 2
    official = DAGM2007(root, official_test=False)
    assert official.test_samples is None and len(official.train_samples) == 6 * 3
    split = make_split(official.train_samples, official.test_samples, 0.5, 0, val_fraction=0.15, test_fraction=0.2)
    assert all("/Train/" in image_id for image_id in split.test)


# ---- peers: the UAPS repository's variants ---------------------------------------------------------------
def _module(*overrides: str):
    torch.manual_seed(0)
    return build_module(compose_config(list(overrides)))


def test_uamt_half_sum_is_the_code_s_two_sum_mask_normalisation() -> None:
    # student logits 0 -> p = 1/4 each; teacher one-hot: d = (3/4)^2 + 3 (1/4)^2 = 0.75 summed over classes
    student = torch.zeros(1, 4, 1, 2)
    teacher = torch.zeros(1, 4, 1, 2)
    teacher[:, 0] = 1.0
    mask = torch.tensor([[[True, False]]])
    per_pixel = {r: softmax_mse(student, teacher, r) for r in ("mean", "sum", "half_sum")}
    assert per_pixel["sum"][0, 0, 0].item() == pytest.approx(0.75)
    assert per_pixel["mean"][0, 0, 0].item() == pytest.approx(0.1875)
    # UA_MT_train.py: torch.sum(mask * consistency_dist) / (2 * torch.sum(mask)), mask (B, 1, H, W)
    dist = (student.softmax(1) - teacher) ** 2
    official = torch.sum(mask.unsqueeze(1) * dist) / (2 * torch.sum(mask))
    assert official.item() == pytest.approx(0.375)
    assert masked_mean(per_pixel["half_sum"], mask).item() == pytest.approx(official.item())
    assert masked_mean(per_pixel["mean"], mask).item() == pytest.approx(official.item() / 2)  # C/2 = 2


def test_cct_detach_target_false_is_the_code_s_plain_mse() -> None:
    main = torch.tensor([[[[0.0]], [[0.0]]]], requires_grad=True)  # p_main = (1/2, 1/2)
    aux = torch.tensor([[[[math.log(3.0)]], [[0.0]]]], requires_grad=True)  # p_aux = (3/4, 1/4)
    loss = CCT.consistency_loss(main, [aux], detach_target=False)
    assert loss.item() == pytest.approx(0.0625)  # mean((1/4)^2, (1/4)^2)
    loss.backward()
    # L = ((p0 - q0)^2 + (p1 - q1)^2) / 2: dL/dp = (-1/4, 1/4); dp0/dz0 = p0 p1 = 1/4, dp1/dz0 = -1/4
    # -> dL/dz0 = -1/16 - 1/16 = -1/8, and dL/dz1 = +1/8: the main decoder is pulled too
    assert main.grad.flatten().tolist() == pytest.approx([-0.125, 0.125])
    detached = torch.zeros_like(main, requires_grad=True)
    CCT.consistency_loss(detached, [aux.detach().requires_grad_()]).backward()
    assert detached.grad is None


def test_cct_code_variant_drops_with_p_0_3_and_supervises_every_decoder() -> None:
    module = _module("method=cct_code")
    dropouts = [m for m in module.net.modules() if isinstance(m, FeatureDropout)]
    assert [d.p for d in dropouts] == [0.3] and module.aux_supervised and not module.detach_target
    assert [d.p for d in _module("method=cct").net.modules() if isinstance(d, FeatureDropout)] == [0.5]


def test_ucc_head2_perturbation_noises_only_the_second_head() -> None:
    image = torch.randn(2, 3, 32, 32)
    noisy = _module("method=ucc", "method.head2_perturbation=noise").train()
    clean = _module("method=ucc").train()
    no_noise = "+method.head2_perturbation_options.uniform_range=0"
    zero = _module("method=ucc", "method.head2_perturbation=noise", no_noise)
    clean.load_state_dict(noisy.state_dict())  # same weights: the perturbation has no parameters
    zero.load_state_dict(noisy.state_dict())

    def heads(module, *, seed: int = 0):  # the encoder's dropout draws the same masks in every call
        torch.manual_seed(seed)
        with torch.no_grad():
            return module.both_heads(image)

    head1, head2 = heads(noisy)
    ref1, ref2 = heads(clean)
    assert torch.allclose(head1, ref1)  # head 1 always reads clean features
    assert not torch.allclose(head2, ref2)  # head 2 reads x + x * u
    assert torch.allclose(heads(zero.train())[1], ref2)  # u ~ U(0, 0): the clean features
    clean.load_state_dict(noisy.state_dict())  # the same BatchNorm statistics for the eval-mode check
    assert torch.allclose(heads(noisy.eval())[1], heads(clean.eval())[1])  # identity in eval mode


def test_comparison_official_runs_every_peer_in_its_code_variant() -> None:
    params = OmegaConf.load(Path(CONFIG_DIR) / "experiment" / "comparison_official.yaml").hydra.sweeper.params
    assert params.method.split(",") == [
        "supervised", "uaps_code", "mean_teacher_code", "uamt_code", "cct_code", "cps", "dct", "ucc_code",
        "fixmatch", "unimatch",
    ]  # fmt: skip
    method = {m: compose_config(["experiment=comparison_official", f"method={m}"], fast=False).method
              for m in ("uamt_code", "mean_teacher_code", "ucc_code", "cps")}  # fmt: skip
    assert method["uamt_code"].threshold_max == pytest.approx(math.log(2))
    assert method["uamt_code"].class_reduction == "half_sum" and method["uamt_code"].noise_on == "teacher"
    assert method["uamt_code"].threshold_rampup_steps == method["uamt_code"].rampup_steps == 200 * 80
    mean_teacher = method["mean_teacher_code"]
    assert (mean_teacher.noise_on, mean_teacher.consistency_start_step) == ("teacher", 1000)
    assert method["ucc_code"].pseudo_loss == method["cps"].pseudo_loss == "ce_dice"


# ---- Inconsistency Masks family (MichaelVorndran/InconsistencyMasks, functions.py) ----------------------
def test_filter_bad_predictions_is_the_official_keep_rule() -> None:
    # official: keep iff predsize > im_size and predsize > 0 (agreed foreground vs inconsistency, in pixels)
    labels = torch.zeros(4, 1, 4, dtype=torch.int64)
    mask = torch.zeros(4, 1, 4, dtype=torch.bool)
    labels[0, 0, :2] = 1  # 2 agreed foreground, 1 inconsistent -> kept
    mask[0, 0, 3] = True
    labels[1, 0, :1] = 1  # 1 agreed foreground, 1 inconsistent -> dropped (not larger)
    mask[1, 0, 3] = True
    # image 2: no foreground, no inconsistency -> dropped (predsize 0)
    labels[3, 0, :1] = 1  # 1 agreed foreground, nothing inconsistent -> kept
    assert filter_bad_predictions(labels, mask).tolist() == [True, False, False, True]


def test_two_teachers_binary_vote_then_keep_filter() -> None:
    # two teachers' foreground probabilities on 1 x 4 pixels: agree fg, agree fg, disagree, agree bg
    foreground = torch.tensor([[[[0.9, 0.8, 0.7, 0.1]]], [[[0.6, 0.9, 0.2, 0.3]]]])
    probs = torch.stack([1 - foreground, foreground], dim=2)  # (n, B, C=2, H, W)
    labels, mask = inconsistency_mask(probs)
    assert labels.tolist() == [[[1, 1, 0, 0]]] and mask.tolist() == [[[False, False, True, False]]]
    assert filter_bad_predictions(labels, mask).tolist() == [True]  # 2 > 1


@pytest.mark.parametrize(("handling", "expected"), [("ignore", 255), ("background", 0), ("class", 5)])
def test_masked_pixels_target_follows_im_handling(handling: str, expected: int) -> None:
    cfg = compose_config(["method=im", f"method.im_handling={handling}"])
    assert masked_label_value(cfg) == expected  # synthetic: 5 classes, background 0, ignore 255
    build_module(student_config(cfg, Path("unused"), {}))  # the student accepts the option


def test_evalnet_iou_of_two_empty_masks_is_0_as_officially() -> None:
    empty = np.zeros((4, 4), dtype=np.int64)
    assert label_iou(empty, empty, 2, 255) == 0.0  # get_IoU_binary: 0 / (0 + 1e-7)
    assert label_iou(empty, empty, 2, 255, empty_iou=1.0) == 1.0
    one = empty.copy()
    one[0, 0] = 1
    assert label_iou(one, one, 2, 255) == 1.0 and label_iou(one, empty, 2, 255) == 0.0


def test_noisy_student_dropout_schedule_refuses_a_model_without_its_keys() -> None:
    cfg = compose_config(["method=noisy_student", "model=unet", "method.noisy_student.dropout=[0.0,0.3]"])
    with pytest.raises(ConfigError, match="model=unet has none of the dropout keys"):
        student_config(cfg, Path("unused"), {"dropout": 0.3})
    assert compose_config(["method=noisy_student"]).method.noisy_student.dropout is None  # official: none
    im_unet = compose_config(["method=noisy_student", "model=im_unet", "method.noisy_student.dropout=[0.0,0.3]"])
    assert student_config(im_unet, Path("unused"), {"dropout": 0.3}).model.dropout_encoder == 0.3


def test_noisy_student_widths_are_the_official_table_and_generation_0_is_shared() -> None:
    options = LoopOptions(generations=5, num_teachers=1, pseudo_labeler="single",
                          noisy_student={"width_multiplier": [0.5, 1.5]})  # fmt: skip
    assert options.schedule(0) == {}  # the LDT teachers at the model's own width, the same as IM's
    widths = [options.schedule(g)["width_multiplier"] for g in range(1, 6)]
    assert widths == pytest.approx([0.5, 0.75, 1.0, 1.25, 1.5])  # alphas of 08_ISIC_2018_noisy_student.py
    single = LoopOptions(generations=1, num_teachers=1, pseudo_labeler="single",
                         noisy_student={"width_multiplier": [0.5, 1.5]})  # fmt: skip
    assert single.schedule(1)["width_multiplier"] == 1.5  # one generation: the last value


def test_binary_model_ensemble_unanimous_vote_is_the_official_one() -> None:
    # three teachers, 1 x 3 pixels: all vote fg; 2 of 3 vote fg; none does
    foreground = torch.tensor([[[[0.9, 0.9, 0.1]]], [[[0.8, 0.9, 0.2]]], [[[0.7, 0.1, 0.3]]]])
    probs = torch.stack([1 - foreground, foreground], dim=2)
    assert model_ensemble(probs)[0].tolist() == [[[1, 1, 0]]]  # mean fg (0.8, 0.63, 0.2)
    labels, mask = model_ensemble(probs, "unanimous")
    assert labels.tolist() == [[[1, 0, 0]]] and not mask.any()  # pred_sum < len(models) -> 0
    with pytest.raises(ConfigError, match="ensemble_vote"):
        model_ensemble(probs, "majority")


def test_official_evalnet_copy_rule_never_drops() -> None:
    # min 0.72, max 0.75: step 0.006; 0.70 -> 1, 0.725 -> 1 + int(0.005 / 0.006) = 1, 0.735 -> 1 + 2 = 3,
    # 0.749 -> 1 + 4 = 5, 0.80 -> 5
    scores = np.array([0.70, 0.725, 0.735, 0.749, 0.80])
    assert official_copies(scores, 0.72, 0.75).tolist() == [1, 1, 3, 5, 5]
    assert copies_from_scores(scores, 0.75).tolist() == [0, 0, 0, 0, 1]  # the default rule drops


def test_mask_morphology_erodes_first_as_officially() -> None:
    speck = torch.zeros(1, 7, 7, dtype=torch.bool)
    speck[0, 3, 3] = True  # a one-pixel inconsistency
    assert not morph_mask(speck, dilate_kernel=3, erode_kernel=3).any()  # cv2.erode, then cv2.dilate: gone
    assert torch.equal(morph_mask(speck, 3, 3, order="dilate_erode"), speck)  # a closing keeps it
    with pytest.raises(ConfigError, match="morph_order"):
        morph_mask(speck, 3, 3, order="sideways")
