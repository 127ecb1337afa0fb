"""CCT, UCC, FixMatch, UniMatch: their losses where the answer is known, and the views the DataModule gives them."""

from __future__ import annotations

import math

import pytest
import torch
from hydra.utils import get_class

from semiseg.errors import ConfigError, user_error_in
from semiseg.losses import cross_entropy
from semiseg.methods.cct import CCT
from semiseg.methods.pseudo_labels import confident_cross_entropy, kl_discrepancy, ramp_length
from semiseg.methods.ucc import uncertainty_weighted_pseudo_loss
from semiseg.runner import build_datamodule, build_module

SIZE = 32
NUM_CLASSES = 5  # the synthetic set: background + 4 defects
IGNORE = 255


def module_for(make_cfg, method: str, *overrides: str):
    torch.manual_seed(0)
    return build_module(make_cfg(f"method={method}", *overrides))


def batches(labeled_size: int = 2, unlabeled_size: int = 3, box: bool = True) -> tuple[dict, dict]:
    """A labeled and an unlabeled batch with every view any method asks for."""
    generator = torch.Generator().manual_seed(1)
    labeled = {
        "image": torch.randn(labeled_size, 3, SIZE, SIZE, generator=generator),
        "mask": torch.randint(0, NUM_CLASSES, (labeled_size, SIZE, SIZE), generator=generator),
    }
    boxes = torch.zeros(unlabeled_size, SIZE, SIZE, dtype=torch.int64)
    if box:
        boxes[:, 4:20, 8:24] = 1
    unlabeled = {
        "image": torch.randn(unlabeled_size, 3, SIZE, SIZE, generator=generator),
        "image_strong": torch.randn(unlabeled_size, 3, SIZE, SIZE, generator=generator),
        "image_strong2": torch.randn(unlabeled_size, 3, SIZE, SIZE, generator=generator),
        "cutmix_box": boxes,
        "cutmix_box2": boxes.flip(-1),
    }
    return labeled, unlabeled


def assert_zero_and_differentiable(loss: torch.Tensor, module: torch.nn.Module) -> None:
    assert torch.isfinite(loss) and loss.item() == 0.0
    loss.backward()
    for parameter in module.parameters():
        assert parameter.grad is None or torch.isfinite(parameter.grad).all()


# ---- the pure loss functions ------------------------------------------------------------------------
def test_confident_cross_entropy_is_zero_below_threshold_and_with_everything_ignored() -> None:
    logits = torch.randn(2, NUM_CLASSES, 8, 8, requires_grad=True)
    target = torch.randint(0, NUM_CLASSES, (2, 8, 8))
    below = confident_cross_entropy(logits, target, torch.full((2, 8, 8), 0.9), threshold=0.95)
    ignored = confident_cross_entropy(logits, torch.full_like(target, IGNORE), torch.ones(2, 8, 8), 0.95)
    for loss in (below, ignored):
        assert torch.isfinite(loss) and loss.item() == 0.0
    above = confident_cross_entropy(logits, target, torch.ones(2, 8, 8), threshold=0.95)
    assert torch.allclose(above, cross_entropy(logits, target))


def test_confident_cross_entropy_divides_by_valid_not_confident_pixels() -> None:
    logits = torch.randn(1, NUM_CLASSES, 4, 4)
    target = torch.randint(0, NUM_CLASSES, (1, 4, 4))
    confidence = torch.zeros(1, 4, 4)
    confidence[0, 0] = 1.0  # 4 of 16 pixels confident
    per_pixel = torch.nn.functional.cross_entropy(logits, target, reduction="none")
    expected = per_pixel[0, 0].sum() / 16
    assert torch.allclose(confident_cross_entropy(logits, target, confidence, 0.95), expected)


@pytest.mark.parametrize("uncertainty", ["kl", "entropy", "none"])
@pytest.mark.parametrize("pseudo_loss", ["ce", "ce_dice"])
def test_ucc_loss_with_every_pixel_ignored_is_zero_not_nan(uncertainty: str, pseudo_loss: str) -> None:
    logits = torch.randn(2, NUM_CLASSES, 8, 8, requires_grad=True)
    target = torch.full((2, 8, 8), IGNORE)
    loss, mean_weight = uncertainty_weighted_pseudo_loss(
        logits, torch.randn(2, NUM_CLASSES, 8, 8), target, uncertainty=uncertainty, pseudo_loss=pseudo_loss
    )
    assert torch.isfinite(loss) and loss.item() == 0.0 and torch.isfinite(mean_weight)
    loss.backward()
    assert torch.isfinite(logits.grad).all()


def test_ucc_identical_predictions_have_full_weight_and_no_discrepancy() -> None:
    logits = torch.randn(2, NUM_CLASSES, 8, 8)
    assert torch.allclose(kl_discrepancy(logits, logits), torch.zeros(2, 8, 8), atol=1e-6)
    target = logits.argmax(1)
    loss, mean_weight = uncertainty_weighted_pseudo_loss(logits, logits, target, uncertainty="kl")
    assert mean_weight.item() == pytest.approx(1.0, abs=1e-6)
    assert torch.allclose(loss, cross_entropy(logits, target), atol=1e-6)  # regulariser 0, weights 1


def test_ucc_disagreement_lowers_the_weight_and_confident_agreement_gives_zero_loss() -> None:
    confident = torch.zeros(1, NUM_CLASSES, 4, 4)
    confident[:, 2] = 50.0
    target = confident.argmax(1)
    loss, weight = uncertainty_weighted_pseudo_loss(confident, confident, target, uncertainty="kl")
    assert loss.item() == pytest.approx(0.0, abs=1e-6) and weight.item() == pytest.approx(1.0)
    other = torch.zeros(1, NUM_CLASSES, 4, 4)
    other[:, 3] = 5.0
    _, lower = uncertainty_weighted_pseudo_loss(other, confident, target, uncertainty="kl")
    _, entropy_weight = uncertainty_weighted_pseudo_loss(other, torch.zeros_like(other), target, uncertainty="entropy")
    assert lower.item() < 0.01 and entropy_weight.item() == pytest.approx(0.0, abs=1e-6)  # uniform peer: H = ln C


def test_ramp_length_reads_steps_and_fractions() -> None:
    assert ramp_length(200, 1000) == 200 and ramp_length(0.1, 600) == pytest.approx(60) and ramp_length(0, None) == 0
    with pytest.raises(ConfigError, match="max_steps"):
        ramp_length(0.1, None)
    with pytest.raises(ConfigError, match="rampup_steps"):
        ramp_length(-1, 100)


# ---- the methods -------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["fixmatch", "unimatch"])
def test_every_pixel_below_threshold_gives_zero_unsupervised_loss(method: str, make_cfg) -> None:
    module = module_for(make_cfg, method, "method.threshold=1.0")  # a softmax never reaches 1 at init
    module.train()
    labeled, unlabeled = batches()
    loss, terms = module.unsupervised_loss(unlabeled, labeled)
    assert terms["confident_fraction"].item() == 0.0
    assert_zero_and_differentiable(loss, module)


def test_unimatch_trains_the_encoder_through_the_feature_perturbation_stream(make_cfg) -> None:
    module = module_for(make_cfg, "unimatch", "method.threshold=0.0", "method.loss_weights=[0,0,1]")
    module.train()
    labeled, unlabeled = batches()
    loss, terms = module.unsupervised_loss(unlabeled, labeled)
    assert terms["loss_fp"].item() > 0 and terms["loss_s1"].item() > 0
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.net.encoder.parameters())
    assert isinstance(module.feature_perturbation.perturbation, torch.nn.Module)


def test_unimatch_total_is_half_of_weighted_sum(make_cfg) -> None:
    module = module_for(make_cfg, "unimatch", "method.threshold=0.0")
    module.train()
    labeled, unlabeled = batches()
    torch.manual_seed(3)
    loss, terms = module.unsupervised_loss(unlabeled, labeled)
    expected = (0.25 * terms["loss_s1"] + 0.25 * terms["loss_s2"] + 0.5 * terms["loss_fp"]) / 2
    assert torch.allclose(loss, expected)
    supervised, sup_terms = module.supervised_loss(labeled)
    assert torch.allclose(supervised, sup_terms["loss_x"] / 2)


def test_cct_identical_predictions_give_zero_and_main_prediction_is_detached(make_cfg) -> None:
    module = module_for(
        make_cfg,
        "cct",
        "method.perturbations=[none]",
        "method.num_aux_decoders=2",
        "method.weight=1",
        "method.rampup_steps=0",
    )
    for aux in module.net.aux_decoders:
        aux.load_state_dict(module.net.network.decoder.state_dict())
    module.train()
    labeled, unlabeled = batches()
    loss, terms = module.unsupervised_loss(unlabeled, labeled)
    assert terms["loss_consistency"].item() == 0.0
    assert_zero_and_differentiable(loss, module)
    main = torch.randn(2, NUM_CLASSES, 8, 8, requires_grad=True)
    aux = torch.randn(2, NUM_CLASSES, 8, 8, requires_grad=True)
    CCT.consistency_loss(main, [aux]).backward()
    assert main.grad is None and aux.grad.abs().sum() > 0


def test_cct_counts_only_encoder_and_main_decoder_at_inference(make_cfg) -> None:
    module = module_for(make_cfg, "cct")
    decoder = sum(p.numel() for p in module.net.network.decoder.parameters())
    assert module.num_params_train == module.num_params + 3 * decoder


def test_ucc_cross_set_cutmix_uses_ground_truth_inside_the_box(make_cfg) -> None:
    """A box over the whole image pastes the labeled image: the targets are its ground truth, weight 1."""
    module = module_for(make_cfg, "ucc", "method.weight=1", "method.rampup_steps=0")
    module.eval()  # no dropout: the two forwards below see the same network
    labeled, unlabeled = batches(labeled_size=2, unlabeled_size=2)
    unlabeled["cutmix_box"] = torch.ones(2, SIZE, SIZE, dtype=torch.int64)
    loss, terms = module.unsupervised_loss(unlabeled, labeled)
    logits1, logits2 = module.both_heads(labeled["image"])
    expected = cross_entropy(logits1, labeled["mask"]) + cross_entropy(logits2, labeled["mask"])
    assert torch.allclose(loss, expected, atol=1e-5)
    assert terms["pixel_weight_mean"].item() == pytest.approx(1.0)


def test_ucc_identical_heads_and_views_give_full_weights(make_cfg) -> None:
    module = module_for(make_cfg, "ucc", "method.mixing=none", "method.weight=1")
    module.head2.load_state_dict(module.net.decoder.state_dict())
    module.eval()
    labeled, unlabeled = batches(box=False)
    unlabeled["image_strong"] = unlabeled["image"]
    loss, terms = module.unsupervised_loss(unlabeled, labeled)
    assert torch.isfinite(loss) and terms["pixel_weight_mean"].item() == pytest.approx(1.0, abs=1e-5)


def test_ucc_ignored_ground_truth_in_the_box_gives_no_nan(make_cfg) -> None:
    module = module_for(make_cfg, "ucc", "method.weight=1")
    module.train()
    labeled, unlabeled = batches()
    labeled["mask"] = torch.full_like(labeled["mask"], IGNORE)
    unlabeled["cutmix_box"] = torch.ones_like(unlabeled["cutmix_box"])
    loss, _ = module.unsupervised_loss(unlabeled, labeled)
    assert torch.isfinite(loss) and loss.item() == 0.0


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("method", "ucc method.uncertainty_weighting=variance"),
        ("method", "ucc method.mixing=mixup"),
        ("method", "fixmatch method.threshold=1.5"),
        ("method", "unimatch method.loss_weights=[1,1]"),
        ("method", "cct method.num_aux_decoders=0"),
    ],
)
def test_bad_options_name_the_key(option: str, value: str, make_cfg) -> None:
    method, override = value.split(" ")
    with pytest.raises(Exception) as raised:
        build_module(make_cfg(f"{option}={method}", override))
    error = user_error_in(raised.value)
    assert isinstance(error, ConfigError) and override.split("=")[0] in str(error)


# ---- views: only what each method asks for ------------------------------------------------------------
EXPECTED_VIEWS = {
    "supervised": None,
    "cct": {"image", "id"},
    "ucc": {"image", "image_strong", "cutmix_box", "id"},
    "fixmatch": {"image", "image_strong", "cutmix_box", "id"},
    "unimatch": {"image", "image_strong", "image_strong2", "cutmix_box", "cutmix_box2", "id"},
}


@pytest.mark.parametrize("method", sorted(EXPECTED_VIEWS))
def test_views_are_supplied_only_to_methods_that_ask(method: str, make_cfg) -> None:
    cfg = make_cfg(f"method={method}")
    datamodule = build_datamodule(cfg, get_class(cfg.method._target_))
    batch, *_ = next(iter(datamodule.train_dataloader()))
    assert set(batch["labeled"]) == {"image", "mask", "id"}
    if EXPECTED_VIEWS[method] is None:
        assert "unlabeled" not in batch
        return
    unlabeled = batch["unlabeled"]
    assert set(unlabeled) == EXPECTED_VIEWS[method]
    size = unlabeled["image"].shape
    for key in ("image_strong", "image_strong2"):
        if key in unlabeled:
            assert unlabeled[key].shape == size and not torch.equal(unlabeled[key], unlabeled["image"])
    for key in ("cutmix_box", "cutmix_box2"):
        if key in unlabeled:
            assert unlabeled[key].shape == (size[0], *size[2:]) and set(unlabeled[key].unique().tolist()) <= {0, 1}


def test_comparison_experiment_sets_the_protocol_for_consistency_methods_only(make_cfg) -> None:
    cct = make_cfg("experiment=comparison", "method=cct", fast=False)
    assert (cct.method.weight, cct.method.rampup_steps) == (0.1, 30000)
    assert (cct.data.batch_size_labeled, cct.data.batch_size_unlabeled) == (16, 16)
    assert cct.optimizer._target_ == "torch.optim.Adam" and cct.dataset.name == "mtiles"
    fixmatch = make_cfg("experiment=comparison", "method=fixmatch", fast=False)
    assert (fixmatch.method.weight, fixmatch.method.threshold) == (1.0, 0.95)
    assert make_cfg("method=cct", fast=False).method.weight == 30.0
    assert not math.isnan(make_cfg("experiment=comparison_cpu", "method=ucc", fast=False).method.rampup_steps)


def test_comparison_sweeps_every_method_ratio_and_seed() -> None:
    from pathlib import Path

    from omegaconf import OmegaConf

    from semiseg.config import CONFIG_DIR

    params = OmegaConf.load(Path(CONFIG_DIR) / "experiment" / "comparison.yaml").hydra.sweeper.params
    methods = params.method.split(",")
    assert set(methods) == {
        "supervised", "uaps", "mean_teacher", "uamt", "cct", "cps", "dct", "ucc", "fixmatch", "unimatch",
    }  # fmt: skip
    assert params.labeled_ratio.split(",") == ["0.1", "0.3", "0.5"] and params.seed.split(",") == ["0", "1", "2"]
