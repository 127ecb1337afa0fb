"""UAPS: perturbations, uncertainty, dynamic mixing, ramp, loss switches, parameter counts, a fast_dev_run."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from semiseg.errors import ConfigError
from semiseg.methods.uaps import UAPS, decoder_uncertainty, disagreement_share, mixed_pseudo_label, mixing_weights
from semiseg.models.perturbations import FeatureDrop, FeatureDropout, FeatureNoise
from semiseg.train import train

UNET = {"_target_": "semiseg.models.unet.UNet", "name": "unet"}
SMALL_UNET = {**UNET, "channels": [4, 8, 16], "encoder_dropout": [0.0, 0.0, 0.0]}


def make_uaps(model: dict = SMALL_UNET, num_classes: int = 3, **options) -> UAPS:
    return UAPS(
        model=model,
        class_names=[f"c{i}" for i in range(num_classes)],
        in_channels=3,
        name="uaps",
        **options,
    )


def batches(size: int = 16, batch: int = 2, num_classes: int = 3) -> tuple[dict, dict]:
    generator = torch.Generator().manual_seed(0)
    labeled = {
        "image": torch.randn(batch, 3, size, size, generator=generator),
        "mask": torch.randint(0, num_classes, (batch, size, size), generator=generator),
    }
    return labeled, {"image": torch.randn(batch, 3, size, size, generator=generator)}


# ---- perturbations --------------------------------------------------------------------------------
def test_feature_noise_is_x_plus_x_times_one_uniform_draw_shared_by_the_batch() -> None:
    torch.manual_seed(0)
    x = torch.rand(4, 8, 16, 16) + 0.5  # positive, so the relative change is the noise itself
    noise = FeatureNoise(0.3).train()
    out = noise(x)
    assert out.shape == x.shape
    relative = (out - x) / x  # (B, C, H, W): u, one (C, H, W) draw
    assert torch.allclose(relative, relative[:1].expand_as(relative), atol=1e-5)
    assert relative.abs().max() <= 0.3 + 1e-5
    u = relative[0].flatten()
    assert abs(u.mean().item()) < 0.02
    assert u.std().item() == pytest.approx(0.3 / math.sqrt(3), rel=0.1)  # std of U(-r, r)
    assert not torch.equal(noise(x), out)  # a new draw per call
    assert torch.equal(noise.eval()(x), x)


def test_feature_dropout_zeroes_half_and_rescales() -> None:
    torch.manual_seed(0)
    x = torch.ones(4, 8, 32, 32)
    out = FeatureDropout(0.5).train()(x)
    assert out.shape == x.shape
    assert (out == 0).float().mean().item() == pytest.approx(0.5, abs=0.02)
    assert torch.all((out == 0) | (out == 2.0))
    assert torch.equal(FeatureDropout(0.5).eval()(x), x)


def test_feature_drop_zeroes_positions_of_high_channel_mean_attention() -> None:
    torch.manual_seed(0)
    attention = torch.linspace(0, 1, 100).view(1, 1, 10, 10)  # max 1
    x = attention.repeat(2, 6, 1, 1)  # channel mean = attention
    out = FeatureDrop((0.7, 0.9)).train()(x)
    assert out.shape == x.shape
    dropped = (out == 0).all(dim=1)  # whole positions, every channel
    kept = (out == x).all(dim=1)
    assert torch.all(dropped | kept)
    level = attention[0].expand_as(dropped)
    assert torch.all(dropped[level >= 0.9])  # above the highest possible threshold
    assert torch.all(kept[level < 0.7])  # below the lowest possible threshold
    assert torch.equal(FeatureDrop().eval()(x), x)


def test_main_decoder_sees_clean_features_aux_decoders_perturbed_ones() -> None:
    torch.manual_seed(0)
    module = make_uaps(num_aux_decoders=3, perturbation_options={"noise": {"uniform_range": 0.3}})
    module.train()
    network = module.net
    received: dict[str, list[torch.Tensor]] = {}

    def capture(name: str):
        def hook(_module, inputs):
            received[name] = [level.clone() for level in inputs[0]]

        return hook

    network.network.decoder.register_forward_pre_hook(capture("main"))
    for k, decoder in enumerate(network.aux_decoders):
        decoder.register_forward_pre_hook(capture(f"aux{k + 1}"))
    encoded: list[torch.Tensor] = []
    network.network.encoder.register_forward_hook(lambda _m, _i, out: encoded.extend(level.clone() for level in out))
    outputs = network.forward_all(torch.randn(2, 3, 16, 16))
    assert len(outputs) == 4 and all(o.shape == (2, 3, 16, 16) for o in outputs)
    assert all(torch.equal(a, b) for a, b in zip(received["main"], encoded, strict=True))
    for name in ("aux1", "aux2", "aux3"):  # every level perturbed
        assert all(not torch.equal(a, b) for a, b in zip(received[name], encoded, strict=True)), name


# ---- uncertainty and mixing ---------------------------------------------------------------------
def test_uncertainty_is_zero_when_all_decoders_agree() -> None:
    probabilities = torch.randn(1, 2, 4, 5, 5).softmax(dim=2).expand(3, -1, -1, -1, -1)
    uncertainty = decoder_uncertainty(probabilities.log())
    assert uncertainty.shape == (3, 2, 5, 5)
    assert torch.allclose(uncertainty, torch.zeros_like(uncertainty), atol=1e-6)


def test_uncertainty_is_kl_of_mean_against_each_decoder() -> None:
    torch.manual_seed(0)
    probabilities = (3 * torch.randn(3, 2, 4, 5, 5)).softmax(dim=2)
    mean = probabilities.mean(dim=0)
    uncertainty = decoder_uncertainty(probabilities.log())
    for k in range(3):
        # KL(p̄ ‖ p_k) = kl_div(input=log p_k, target=p̄), summed over classes
        expected = F.kl_div(probabilities[k].log(), mean, reduction="none").sum(dim=1)
        reverse = F.kl_div(mean.log(), probabilities[k], reduction="none").sum(dim=1)  # KL(p_k ‖ p̄)
        assert torch.allclose(uncertainty[k], expected, atol=1e-5)
        assert not torch.allclose(uncertainty[k], reverse, atol=1e-3)
    assert torch.all(uncertainty >= -1e-6)


def test_dynamic_mixing_weights_lie_on_the_simplex_and_vary() -> None:
    torch.manual_seed(0)
    draws = torch.stack([mixing_weights(4, "dynamic") for _ in range(200)])
    assert draws.shape == (200, 4)
    assert torch.all(draws >= 0)
    assert torch.allclose(draws.sum(dim=1), torch.ones(200), atol=1e-5)
    assert draws.std(dim=0).min() > 0.1  # Dirichlet(1,1,1,1): std sqrt(3/80) ≈ 0.19
    assert torch.allclose(draws.mean(dim=0), torch.full((4,), 0.25), atol=0.05)


def test_average_mixing_gives_the_argmax_of_the_mean() -> None:
    torch.manual_seed(0)
    probabilities = torch.randn(3, 2, 4, 6, 6).softmax(dim=2)
    weights = mixing_weights(3, "average")
    assert torch.allclose(weights, torch.full((3,), 1 / 3))
    assert torch.equal(mixed_pseudo_label(probabilities, weights), probabilities.mean(dim=0).argmax(dim=1))
    one_hot = torch.tensor([0.0, 1.0, 0.0])
    assert torch.equal(mixed_pseudo_label(probabilities, one_hot), probabilities[1].argmax(dim=1))
    with pytest.raises(ConfigError, match="mixing"):
        mixing_weights(3, "median")


def test_disagreement_share() -> None:
    agree = [torch.eye(3).view(1, 3, 3, 1).expand(1, 3, 3, 2)] * 3  # argmax per row 0, 1, 2
    assert disagreement_share(agree).item() == 0.0
    other = agree[0].clone()
    other[:, :, 0, :] = torch.tensor([0.0, 0.0, 1.0]).view(1, 3, 1)  # first row of 3 disagrees
    assert disagreement_share([agree[0], other]).item() == pytest.approx(1 / 3)


# ---- ramp -----------------------------------------------------------------------------------------
class _Step:
    def __init__(self, module: UAPS) -> None:
        self.module = module

    def at(self, step: int) -> tuple[float, float]:
        type(self.module).global_step = property(lambda _self: step)  # type: ignore[assignment]
        try:
            return self.module.loss_weights()
        finally:
            del type(self.module).global_step


def test_ramp_units_and_coefficients() -> None:
    module = make_uaps(ups_coefficient=0.3, un_coefficient=0.5, rampup_length=10, rampup_unit_steps=4)
    weights = _Step(module)
    w1, w2 = weights.at(0)
    assert w1 == pytest.approx(0.3 * math.exp(-5)) and w2 == pytest.approx(0.5 * math.exp(-5))
    assert weights.at(3) == weights.at(0)  # steps 0-3 are ramp unit 0
    assert weights.at(4)[0] == pytest.approx(0.3 * math.exp(-5 * 0.9**2))
    assert weights.at(20)[0] == pytest.approx(0.3 * math.exp(-5 * 0.5**2))
    assert weights.at(40) == pytest.approx((0.3, 0.5))
    assert weights.at(4000) == pytest.approx((0.3, 0.5))
    constant = _Step(make_uaps(un_coefficient=1.0, un_rampup=False, rampup_length=10, rampup_unit_steps=4))
    assert constant.at(0)[1] == 1.0


# ---- losses ----------------------------------------------------------------------------------------
def _unsupervised(module: UAPS, seed: int = 0) -> tuple[torch.Tensor, dict]:
    labeled, unlabeled = batches()
    module.train()
    torch.manual_seed(seed)
    return module.unsupervised_loss(unlabeled, labeled)


@pytest.mark.parametrize("switched_off", ["use_ups", "use_un", "use_ps"])
def test_each_switched_off_term_contributes_exactly_zero(switched_off: str) -> None:
    options = {"use_ups": True, "use_un": True, "use_ps": True, "rampup_length": 0, switched_off: False}
    module = make_uaps(**options)
    loss, terms = _unsupervised(module)
    term = {"use_ups": "loss_ups", "use_un": "loss_un", "use_ps": "loss_ps"}[switched_off]
    assert terms[term].item() == 0.0
    expected = 0.1 * (terms["loss_ups"] + terms["loss_ps"]) + 0.1 * terms["loss_un"]
    assert torch.allclose(loss, expected)
    assert all(terms[name].item() > 0 for name in ("loss_ups", "loss_un", "loss_ps") if name != term)


def test_all_terms_off_gives_exact_zero_without_gradient() -> None:
    module = make_uaps(use_ups=False, use_un=False, use_ps=False, rampup_length=0)
    loss, terms = _unsupervised(module)
    assert loss.item() == 0.0 and not loss.requires_grad
    assert terms["uncertainty_mean"].item() > 0  # still measured and logged


def test_uncertainty_of_a_very_confident_decoder_is_exact() -> None:
    """Issue 19: decoder 0 puts e^-40 on class 0, decoder 1 e^-40 on class 1 (far below a 1e-8 floor).
    By hand, p̄ = (1/2, 1/2) up to e^-40 terms and KL(p̄ ‖ p_k) = 0.5 log(0.5 / e^-40) + 0.5 log(0.5 / 1) = 20 − log 2;
    flooring p_k at 1e-8 gave 0.5 (log 0.5 + 18.42) + 0.5 log 0.5 = 9.21 − log 2 instead."""
    big = 40.0
    # logits: decoder 0 says class 1 with log-odds 40, decoder 1 says class 0 with log-odds 40
    logits = torch.tensor([[0.0, big], [big, 0.0]], dtype=torch.float64).view(2, 1, 2, 1, 1)
    uncertainty = decoder_uncertainty(logits.log_softmax(dim=2))
    expected = big / 2 - math.log(2.0)
    assert torch.allclose(uncertainty, torch.full_like(uncertainty, expected), atol=1e-9)


def test_pixel_and_batch_uncertainty_weighting() -> None:
    torch.manual_seed(0)
    module = make_uaps(use_un=False, rampup_length=0).train()
    logits = [torch.randn(2, 3, 8, 8) for _ in range(4)]
    probabilities = torch.stack([item.softmax(dim=1) for item in logits])
    log_probabilities = torch.stack([item.log_softmax(dim=1) for item in logits])
    uncertainty = decoder_uncertainty(log_probabilities)
    pseudo = mixed_pseudo_label(probabilities, mixing_weights(4, "average"))
    certainty = torch.exp(-uncertainty)
    pixel = module.pseudo_supervision(log_probabilities, probabilities, pseudo, certainty)
    expected_pixel = torch.stack([module.seg_loss(logits[k], pseudo, weight=certainty[k]) for k in range(4)]).mean()
    assert torch.allclose(pixel, expected_pixel)
    module.uncertainty_weighting = "batch"
    batch = module.pseudo_supervision(log_probabilities, probabilities, pseudo, certainty)
    expected_batch = torch.stack([module.seg_loss(logits[k], pseudo) * certainty[k].mean() for k in range(4)]).mean()
    assert torch.allclose(batch, expected_batch)
    assert not torch.allclose(pixel, batch)
    plain = module.pseudo_supervision(log_probabilities, probabilities, pseudo, None)
    assert torch.allclose(plain, torch.stack([module.seg_loss(item, pseudo) for item in logits]).mean())


def test_supervised_loss_is_the_mean_over_decoders_and_terms_are_logged() -> None:
    module = make_uaps(num_aux_decoders=2)
    labeled, unlabeled = batches()
    module.train()
    loss, terms = module.training_losses(labeled, unlabeled)
    per_decoder = torch.stack([terms["loss_sup_main"], terms["loss_sup_aux1"], terms["loss_sup_aux2"]])
    assert torch.allclose(terms["loss_sup"], per_decoder.mean())
    expected = {"loss_ups", "loss_un", "loss_ps", "w1", "w2", "uncertainty_mean", "disagreement", "loss_unsup"}
    assert expected <= set(terms)
    lambdas = torch.stack([terms["lambda_main"], terms["lambda_aux1"], terms["lambda_aux2"]])
    assert lambdas.sum().item() == pytest.approx(1.0, abs=1e-5)
    loss.backward()
    assert all(p.grad is not None for p in module.net.aux_decoders.parameters())


def test_detached_uncertainty_weights_change_only_the_gradient() -> None:
    attached = make_uaps(use_un=False, rampup_length=0)
    detached = make_uaps(use_un=False, rampup_length=0, detach_uncertainty_weights=True)
    detached.load_state_dict(attached.state_dict())
    loss_a, _ = _unsupervised(attached)
    loss_d, _ = _unsupervised(detached)
    assert torch.allclose(loss_a, loss_d)
    loss_a.backward()
    loss_d.backward()
    grads_a = torch.cat([p.grad.flatten() for p in attached.net.parameters() if p.grad is not None])
    grads_d = torch.cat([p.grad.flatten() for p in detached.net.parameters() if p.grad is not None])
    assert not torch.allclose(grads_a, grads_d)


def test_certainty_temperature_sharpens_the_weights() -> None:
    """``exp(−u / τ)``: τ = 1 is the paper; a small τ leaves little weight where the decoders disagree."""
    paper = make_uaps(use_un=False, rampup_length=0)
    sharp = make_uaps(use_un=False, rampup_length=0, certainty_temperature=0.25)
    sharp.load_state_dict(paper.state_dict())
    captured: dict[str, list] = {}
    for name, module in (("paper", paper), ("sharp", sharp)):
        original = module.pseudo_supervision

        def spy(*args, name=name, original=original):
            captured[name] = [weight.detach() for weight in args[3]]
            return original(*args)

        module.pseudo_supervision = spy
        _unsupervised(module)
    for paper_weight, sharp_weight in zip(captured["paper"], captured["sharp"], strict=True):
        assert torch.allclose(sharp_weight, paper_weight**4, rtol=1e-4)  # exp(−4u) = exp(−u)^4
        assert (sharp_weight <= paper_weight + 1e-7).all()


# ---- networks and configuration --------------------------------------------------------------------
@pytest.mark.parametrize(
    ("num_aux", "expected"), [(0, 1_814_052), (1, 2_447_352), (2, 3_080_652), (3, 3_713_952), (4, 4_347_252)]
)
def test_parameter_counts(num_aux: int, expected: int) -> None:
    module = make_uaps(model=UNET, num_classes=4, num_aux_decoders=num_aux)
    assert module.num_params_train == expected
    assert module.num_params == 1_814_052  # inference: encoder + main decoder
    ensemble = make_uaps(model=UNET, num_classes=4, num_aux_decoders=num_aux, inference="ensemble")
    assert ensemble.num_params == expected


def test_perturbations_cycle_past_three() -> None:
    module = make_uaps(num_aux_decoders=4)
    kinds = [type(p.perturbation) for p in module.net.perturbations]
    assert kinds == [FeatureNoise, FeatureDropout, FeatureDrop, FeatureNoise]


def test_ensemble_inference_is_the_mean_softmax() -> None:
    module = make_uaps(inference="ensemble").eval()
    image = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        expected = torch.stack([o.softmax(dim=1) for o in module.net.forward_all(image)]).mean(dim=0)
        assert torch.allclose(module(image).exp(), expected, atol=1e-5)
        main = make_uaps().eval()
        main.load_state_dict(module.state_dict())
        assert torch.allclose(main(image), main.net.network(image))


@pytest.mark.parametrize(
    "bad",
    [
        {"mixing": "random"},
        {"uncertainty_weighting": "image"},
        {"inference": "aux"},
        {"num_aux_decoders": -1},
        {"rampup_unit_steps": 0},
        {"certainty_temperature": 0},
        {"certainty_temperature": True},
    ],
)
def test_bad_options_raise_config_error(bad: dict) -> None:
    with pytest.raises(ConfigError, match=next(iter(bad))):
        make_uaps(**bad)


@pytest.mark.parametrize(
    "overrides",
    [
        (),
        ("method.mixing=average", "method.uncertainty_weighting=batch", "method.inference=ensemble"),
        ("+method/uaps_losses=ps_un", "method.num_aux_decoders=0"),
    ],
)
def test_fast_dev_run(make_cfg, overrides: tuple[str, ...]) -> None:
    results = train(make_cfg("method=uaps", "trainer.fast_dev_run=true", *overrides))
    assert results["method"] == "uaps" and results["steps"] == 1
    assert 0.0 <= results["metrics"]["test/mIoU"] <= 1.0


def test_checkpoint_hyperparameters_are_plain(make_cfg) -> None:
    from omegaconf import OmegaConf

    from semiseg.runner import build_module

    module = build_module(make_cfg("method=uaps"))
    assert not any(OmegaConf.is_config(value) for value in module.hparams.values())
    assert type(module.hparams["perturbations"]) is list and type(module.hparams["perturbation_options"]) is dict
    assert module.hparams["perturbations"] == ["noise", "dropout", "feature_drop"]
    assert module.hparams["perturbation_options"]["feature_drop"] == {"threshold_range": [0.7, 0.9]}
