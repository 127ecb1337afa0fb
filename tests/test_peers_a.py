"""Mean Teacher, UA-MT, deep co-training, CPS and their shared consistency helpers."""

from __future__ import annotations

import copy
import math

import lightning as L
import pytest
import torch

from semiseg.errors import ConfigError, user_error_in
from semiseg.methods.consistency import (
    entropy,
    fgsm,
    js_divergence,
    masked_mean,
    mean_prediction_entropy,
    soft_cross_entropy,
    softmax_mse,
)
from semiseg.methods.cps import CPS
from semiseg.methods.dct import DCT
from semiseg.methods.mean_teacher import MeanTeacher
from semiseg.methods.uamt import UAMT
from semiseg.runner import build_datamodule, build_module

TINY_MODEL = ["model.channels=[4,8]", "model.encoder_dropout=[0.0,0.1]"]
NUM_CLASSES = 5  # the synthetic dataset: background + 4 defect kinds


def tiny_module(make_cfg, method: str, *overrides: str):
    return build_module(make_cfg(f"method={method}", *TINY_MODEL, *overrides))


def batches(num_classes: int = NUM_CLASSES, size: int = 16, ignore_all: bool = False) -> tuple[dict, dict]:
    generator = torch.Generator().manual_seed(0)
    mask = torch.randint(0, num_classes, (2, size, size), generator=generator)
    if ignore_all:
        mask = torch.full_like(mask, 255)
    labeled = {"image": torch.randn(2, 3, size, size, generator=generator), "mask": mask}
    unlabeled = {"image": torch.randn(2, 3, size, size, generator=generator)}
    return labeled, unlabeled


def assert_config_error(make_cfg, method: str, option: str) -> None:
    """Building ``method`` with ``method.<option>`` fails with a ConfigError naming the key (Hydra wraps it)."""
    with pytest.raises(Exception) as raised:
        tiny_module(make_cfg, method, f"method.{option}")
    error = user_error_in(raised.value)
    assert isinstance(error, ConfigError) and f"method.{option.split('=')[0]}=" in str(error)


def assert_finite_gradients(module: torch.nn.Module, loss: torch.Tensor) -> None:
    module.zero_grad()
    loss.backward()
    grads = [p.grad for p in module.parameters() if p.requires_grad and p.grad is not None]
    assert grads, "no gradient reached the trainable parameters"
    assert all(torch.isfinite(g).all() for g in grads)


# ---- the shared consistency helpers ----------------------------------------------------------------
def test_softmax_mse_is_zero_for_identical_predictions_and_sum_is_c_times_mean() -> None:
    logits = torch.randn(2, 4, 3, 3)
    assert softmax_mse(logits, logits.softmax(1)).abs().max() == 0
    other = torch.randn(2, 4, 3, 3).softmax(1)
    mean, total = softmax_mse(logits, other, "mean"), softmax_mse(logits, other, "sum")
    assert mean.shape == (2, 3, 3)
    torch.testing.assert_close(total, 4 * mean)
    with pytest.raises(ConfigError, match="class_reduction"):
        softmax_mse(logits, other, "max")


def test_masked_mean_of_an_empty_mask_is_zero_with_finite_gradient() -> None:
    values = torch.rand(2, 4, 4, requires_grad=True)
    loss = masked_mean(values, torch.zeros(2, 4, 4, dtype=torch.bool))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(values.grad).all() and values.grad.abs().max() == 0
    mask = torch.zeros(2, 4, 4, dtype=torch.bool)
    mask[0, 1, 2] = True
    assert masked_mean(values, mask).item() == pytest.approx(values[0, 1, 2].item())


def test_js_divergence_properties() -> None:
    a, b = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    assert js_divergence(a, a).abs().max() < 1e-6
    torch.testing.assert_close(js_divergence(a, b), js_divergence(b, a))
    assert (js_divergence(a, b) > 0).all()
    # saturated, opposite predictions: finite and at the ln 2 bound
    hard1 = torch.tensor([1e4, -1e4, 0.0]).view(1, 3, 1, 1)
    hard2 = torch.tensor([-1e4, 1e4, 0.0]).view(1, 3, 1, 1)
    value = js_divergence(hard1, hard2)
    assert torch.isfinite(value).all() and value.item() == pytest.approx(math.log(2), abs=1e-5)
    # agrees with the entropy form H(m) - (H(p1) + H(p2)) / 2
    p1, p2 = a.softmax(1), b.softmax(1)
    entropy_form = entropy((p1 + p2) / 2, eps=0) - (entropy(p1, eps=0) + entropy(p2, eps=0)) / 2
    torch.testing.assert_close(js_divergence(a, b), entropy_form, atol=1e-6, rtol=1e-5)


def test_entropy_and_soft_cross_entropy() -> None:
    uniform = torch.full((1, 6, 2, 2), 1 / 6)
    assert entropy(uniform, eps=0).flatten().tolist() == pytest.approx([math.log(6)] * 4)
    samples = torch.stack([torch.eye(2).view(1, 2, 2, 1)[:, :, :1], torch.eye(2).view(1, 2, 2, 1)[:, :, 1:]])
    # two confident but opposite passes: the mean is uniform, the predictive entropy is ln 2
    assert mean_prediction_entropy(samples).item() == pytest.approx(math.log(2), abs=1e-5)
    logits = torch.randn(1, 3, 2, 2)
    torch.testing.assert_close(soft_cross_entropy(logits.softmax(1), logits), entropy(logits.softmax(1), eps=0))


def test_fgsm_moves_by_epsilon_raises_the_loss_and_leaves_no_parameter_gradient() -> None:
    torch.manual_seed(0)
    net = torch.nn.Conv2d(3, 4, 3, padding=1)
    image, target = torch.randn(2, 3, 8, 8), torch.randint(0, 4, (2, 8, 8))
    adversarial = fgsm(net, image, target, epsilon=0.05)
    assert not adversarial.requires_grad
    assert (adversarial - image).abs().max().item() == pytest.approx(0.05, rel=1e-4)
    assert all(p.grad is None for p in net.parameters())
    loss = torch.nn.functional.cross_entropy
    assert loss(net(adversarial), target) > loss(net(image), target)


# ---- Mean Teacher ----------------------------------------------------------------------------------
def test_mean_teacher_loss_is_zero_when_student_and_teacher_agree(make_cfg) -> None:
    module = tiny_module(make_cfg, "mean_teacher", "method.noise_std=0", "method.teacher_mode=eval")
    module.net.eval()  # deterministic student, identical to the teacher it was copied from
    labeled, unlabeled = batches()
    loss, terms = module.unsupervised_loss(unlabeled, labeled)
    assert loss.item() == 0.0 and terms["loss_consistency"].item() == 0.0


def test_teacher_gets_no_gradient_and_is_not_counted_as_trainable(make_cfg) -> None:
    module = tiny_module(make_cfg, "mean_teacher")
    assert isinstance(module, MeanTeacher)
    labeled, unlabeled = batches()
    loss, terms = module.training_losses(labeled, unlabeled)
    assert terms["loss_consistency"] > 0
    assert_finite_gradients(module, loss)
    assert all(not p.requires_grad and p.grad is None for p in module.teacher.parameters())
    student_params = sum(p.numel() for p in module.net.parameters())
    assert module.num_params_train == module.num_params == student_params
    module.inference = "teacher"
    assert module.inference_network is module.teacher.module and module.num_params == student_params


def test_ema_update_moves_the_teacher_towards_the_student(make_cfg) -> None:
    module = tiny_module(make_cfg, "mean_teacher", "method.ema_buffers=ema")
    before = [p.clone() for p in module.teacher.parameters()]
    with torch.no_grad():
        for p in module.net.parameters():
            p.add_(1.0)
        for b in module.net.buffers():
            if b.is_floating_point():
                b.add_(1.0)
    module.teacher.update(module.net, decay=0.75)
    for old, new, student in zip(before, module.teacher.parameters(), module.net.parameters(), strict=True):
        torch.testing.assert_close(new, 0.75 * old + 0.25 * student)
    teacher_bn = module.teacher.module.encoder.levels[0][1]
    student_bn = module.net.encoder.levels[0][1]
    torch.testing.assert_close(teacher_bn.running_mean, 0.25 * student_bn.running_mean)  # 0.75 * 0 + 0.25 * 1


def test_own_buffer_policy_leaves_the_teacher_statistics_alone(make_cfg) -> None:
    module = tiny_module(make_cfg, "mean_teacher")  # ema_buffers: own (the default)
    teacher_bn = module.teacher.module.encoder.levels[0][1]
    with torch.no_grad():
        module.net.encoder.levels[0][1].running_mean.add_(1.0)
    module.teacher.update(module.net, decay=0.5)
    assert teacher_bn.running_mean.abs().max() == 0


def test_consistency_weight_ramps_and_waits_for_the_start_step(make_cfg) -> None:
    module = tiny_module(make_cfg, "mean_teacher", "method.rampup_steps=100")
    assert module.consistency_weight() == pytest.approx(0.1 * math.exp(-5))
    delayed = tiny_module(make_cfg, "mean_teacher", "method.consistency_start_step=10")
    assert delayed.consistency_weight() == 0.0


def test_training_updates_the_teacher_after_each_step(make_cfg) -> None:
    cfg = make_cfg("method=mean_teacher", *TINY_MODEL, "trainer.max_steps=3")
    module = build_module(cfg)
    datamodule = build_datamodule(cfg, type(module))
    initial = copy.deepcopy(module.teacher.module.state_dict())
    trainer = L.Trainer(
        max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, accelerator="cpu",
    )  # fmt: skip
    trainer.fit(module, datamodule=datamodule)
    changed = [not torch.equal(initial[k], v) for k, v in module.teacher.module.state_dict().items()]
    assert any(changed)
    assert all(not p.requires_grad for p in module.teacher.parameters())


@pytest.mark.parametrize("option", ["ema_buffers=mean", "teacher_mode=test", "noise_on=student", "inference=ema"])
def test_mean_teacher_rejects_unknown_choices(make_cfg, option: str) -> None:
    assert_config_error(make_cfg, "mean_teacher", option)


# ---- UA-MT -----------------------------------------------------------------------------------------
def test_uamt_threshold_ramps_from_three_quarters_of_ln_c_to_ln_c(make_cfg) -> None:
    ramping = tiny_module(make_cfg, "uamt", "method.threshold_rampup_steps=100")
    assert isinstance(ramping, UAMT)
    start = (0.75 + 0.25 * math.exp(-5)) * math.log(NUM_CLASSES)
    assert ramping.threshold() == pytest.approx(start)
    done = tiny_module(make_cfg, "uamt", "method.threshold_rampup_steps=0")
    assert done.threshold() == pytest.approx(math.log(NUM_CLASSES))
    code = tiny_module(make_cfg, "uamt", "method.threshold_rampup_steps=0", "method.threshold_max=0.6931")
    assert code.threshold() == pytest.approx(0.6931)


def test_uamt_with_every_pixel_uncertain_gives_zero_loss_without_nan(make_cfg) -> None:
    module = tiny_module(make_cfg, "uamt", "method.threshold_max=1e-12", "method.num_passes=2")
    labeled, unlabeled = batches()
    loss, terms = module.training_losses(labeled, unlabeled)
    assert terms["certain_fraction"].item() == 0.0
    assert terms["loss_consistency"].item() == 0.0 and torch.isfinite(loss)
    assert_finite_gradients(module, loss)


def test_uamt_with_every_pixel_certain_is_the_mean_teacher_loss(make_cfg) -> None:
    options = ("method.threshold_max=100", "method.num_passes=2", "method.noise_std=0", "method.teacher_mode=eval")
    module = tiny_module(make_cfg, "uamt", *options).eval()
    labeled, unlabeled = batches()
    _, terms = module.unsupervised_loss(unlabeled, labeled)
    assert terms["certain_fraction"].item() == 1.0
    plain = softmax_mse(module.net(unlabeled["image"]), module.teacher(unlabeled["image"]).softmax(1)).mean()
    assert terms["loss_consistency"].item() == pytest.approx(plain.item(), rel=1e-5)


def test_uamt_rejects_bad_passes(make_cfg) -> None:
    assert_config_error(make_cfg, "uamt", "num_passes=0")


# ---- deep co-training ------------------------------------------------------------------------------
def test_dct_agreement_is_zero_for_identical_networks(make_cfg) -> None:
    module = tiny_module(make_cfg, "dct")
    assert isinstance(module, DCT)
    module.net2.load_state_dict(module.net.state_dict())
    module.eval()
    labeled, unlabeled = batches()
    module.supervised_loss(labeled)
    _, terms = module.unsupervised_loss(unlabeled, labeled)
    assert terms["loss_cot"].item() == pytest.approx(0.0, abs=1e-7)
    assert terms["loss_dif"].item() > 0  # the adversarial views still differ


def test_dct_trains_both_networks_and_survives_fully_ignored_masks(make_cfg) -> None:
    module = tiny_module(make_cfg, "dct", "method.rampup_steps=0")
    labeled, unlabeled = batches(ignore_all=True)
    loss, terms = module.training_losses(labeled, unlabeled)
    assert torch.isfinite(loss) and terms["loss_dif"] > 0 and terms["loss_cot"] > 0
    assert_finite_gradients(module, loss)
    assert any(p.grad.abs().sum() > 0 for p in module.net2.parameters() if p.grad is not None)


def test_dct_epsilon_zero_makes_the_view_difference_a_plain_cross_entropy(make_cfg) -> None:
    module = tiny_module(make_cfg, "dct", "method.epsilon=0", "method.dif_on_labeled=false").eval()
    labeled, unlabeled = batches()
    module.supervised_loss(labeled)
    _, terms = module.unsupervised_loss(unlabeled, labeled)
    image = unlabeled["image"]
    p1, p2 = module.net(image), module.net2(image)
    expected = soft_cross_entropy(p1.softmax(1), p2).mean() + soft_cross_entropy(p2.softmax(1), p1).mean()
    assert terms["loss_dif"].item() == pytest.approx(expected.item(), rel=1e-5)


# ---- CPS ---------------------------------------------------------------------------------------------
def test_cps_concat_equals_half_the_sum_for_equal_batches(make_cfg) -> None:
    module = tiny_module(make_cfg, "cps").eval()
    assert isinstance(module, CPS) and module.weight == 1.5 and module.rampup(module.rampup_steps) == 1.0
    labeled, unlabeled = batches()
    module.supervised_loss(labeled)
    _, summed = module.unsupervised_loss(unlabeled, labeled)
    module.combine = "concat"
    _, concatenated = module.unsupervised_loss(unlabeled, labeled)
    expected = (summed["loss_cps_unlabeled"] + summed["loss_cps_labeled"]) / 2
    assert concatenated["loss_cps"].item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("options", [("method.mixing=cutmix",), ("method.pseudo_loss=ce_dice",)])
def test_cps_variants_are_finite_with_fully_ignored_masks(make_cfg, options: tuple[str, ...]) -> None:
    module = tiny_module(make_cfg, "cps", *options)
    labeled, unlabeled = batches(ignore_all=True)
    loss, terms = module.training_losses(labeled, unlabeled)
    assert torch.isfinite(loss) and terms["loss_cps"] > 0
    assert_finite_gradients(module, loss)


def test_cps_cutmix_pseudo_labels_follow_the_box(make_cfg, monkeypatch) -> None:
    module = tiny_module(make_cfg, "cps", "method.mixing=cutmix").eval()
    boxes = torch.zeros(2, 16, 16, dtype=torch.bool)
    boxes[:, :8] = True
    monkeypatch.setattr("semiseg.methods.cps.random_boxes", lambda *args, **kwargs: boxes)
    image = torch.randn(2, 3, 16, 16)
    _, _, pseudo1, _ = module.cutmix_logits(image)
    plain = module.net(image).argmax(1)
    assert torch.equal(pseudo1[:, 8:], plain[:, 8:])
    assert torch.equal(pseudo1[:, :8], plain.roll(1, dims=0)[:, :8])


def test_cps_rejects_unknown_choices(make_cfg) -> None:
    assert_config_error(make_cfg, "cps", "mixing=classmix")
