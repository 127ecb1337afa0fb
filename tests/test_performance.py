"""The fast paths that must not change what is computed: the CPU dropout drawn as a uniform mask (the same
distribution as ``F.dropout``, swapped in by ``performance.cpu_dropout``) and the wall-clock breakdown of a fit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from semiseg.config import compose_config
from semiseg.errors import ConfigError
from semiseg.methods.uaps import mixed_pseudo_label
from semiseg.models.perturbations import FeatureDropout, FeatureNoise, UniformMaskDropout, use_uniform_mask_dropout
from semiseg.models.unet import dense_gradient
from semiseg.runner import apply_performance, build_module
from semiseg.train import train


@pytest.mark.parametrize("p", [0.05, 0.5, 0.9])
def test_uniform_mask_dropout_keeps_each_element_with_probability_one_minus_p(p: float) -> None:
    torch.manual_seed(0)
    x = torch.full((64, 8, 64, 64), 2.0, requires_grad=True)  # 2.1 M elements: share within ~0.1 % of p
    out = UniformMaskDropout(p).train()(x)
    dropped = (out == 0).float().mean().item()
    assert dropped == pytest.approx(p, abs=2e-3)
    kept = out[out != 0]
    assert torch.allclose(kept, torch.full_like(kept, 2.0 / (1 - p)))  # the scale of F.dropout
    out.sum().backward()
    assert torch.equal(x.grad != 0, out != 0)  # the gradient flows through the kept elements only
    assert torch.allclose(x.grad[out != 0], torch.full_like(kept, 1 / (1 - p)))


def test_uniform_mask_dropout_in_eval_and_at_the_edges() -> None:
    x = torch.randn(2, 3, 4, 4)
    assert torch.equal(UniformMaskDropout(0.5).eval()(x), x)
    assert torch.equal(UniformMaskDropout(0.0).train()(x), x)
    assert torch.equal(UniformMaskDropout(1.0).train()(x), torch.zeros_like(x))
    channels_last = x.contiguous(memory_format=torch.channels_last)
    assert UniformMaskDropout(0.5).train()(channels_last).is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("channels_last", [False, True])
def test_feature_noise_is_one_multiplicative_draw_shared_by_the_batch(channels_last: bool) -> None:
    """``x (1 + u)``, ``u ~ U(-r, r)`` of shape ``(C, H, W)``: every image of the batch gets the same factor at a
    position, the factors fill ``[1 - r, 1 + r)``, and a ``channels_last`` map stays ``channels_last``."""
    torch.manual_seed(0)
    x = torch.full((4, 8, 32, 32), 2.0, requires_grad=True)
    source = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    noise = FeatureNoise(uniform_range=0.3).train()
    out = noise(source)
    factor = out.detach() / 2.0
    assert torch.equal(factor, factor[:1].expand_as(factor))  # shared by the batch
    assert factor.min() >= 0.7 and factor.max() < 1.3
    assert factor.min() < 0.72 and factor.max() > 1.28  # the whole range is drawn
    assert abs(factor.mean().item() - 1.0) < 0.01
    assert len(torch.unique(factor[0])) > 8000  # one draw per (C, H, W) position, not per channel or row
    assert out.is_contiguous(memory_format=torch.channels_last) == channels_last
    out.sum().backward()
    assert torch.allclose(x.grad, factor)  # d/dx of x (1 + u)
    assert torch.equal(noise.eval()(source), source)


def test_mixed_pseudo_label_takes_decoders_one_by_one_or_stacked() -> None:
    torch.manual_seed(0)
    probabilities = [torch.rand(2, 3, 8, 8).contiguous(memory_format=torch.channels_last) for _ in range(4)]
    weights = torch.tensor([0.1, 0.2, 0.3, 0.4])
    expected = (weights.view(-1, 1, 1, 1, 1) * torch.stack(probabilities)).sum(dim=0).argmax(dim=1)
    assert torch.equal(mixed_pseudo_label(probabilities, weights), expected)
    assert torch.equal(mixed_pseudo_label(torch.stack(probabilities), weights), expected)
    with pytest.raises(ValueError):
        mixed_pseudo_label(probabilities[:3], weights)  # one weight per decoder


def test_dense_gradient_hands_a_dense_channels_last_gradient_to_the_upsampling() -> None:
    """The gradient of one input of a channel concatenation is a strided slice; ``dense_gradient`` makes what
    reaches the input before it (the upsampling) dense ``channels_last``, with the same values."""
    torch.manual_seed(0)
    source = torch.randn(2, 4, 6, 6).contiguous(memory_format=torch.channels_last).requires_grad_()
    upsampled = nn.functional.interpolate(source, scale_factor=2, mode="bilinear", align_corners=True)
    skip = torch.randn(2, 4, 12, 12).contiguous(memory_format=torch.channels_last)
    seen: list[torch.Tensor] = []
    upsampled.register_hook(seen.append)  # the gradient the upsampling's backward receives
    joined = torch.cat([skip, dense_gradient(upsampled)], dim=1)
    grad = torch.randn_like(joined)
    joined.backward(grad)
    assert seen[0].is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(seen[0], grad[:, 4:])
    expected = torch.autograd.grad(
        nn.functional.interpolate(source, scale_factor=2, mode="bilinear", align_corners=True), source, grad[:, 4:]
    )[0]
    assert torch.equal(source.grad, expected)
    plain = torch.randn(2, 4, 6, 6, requires_grad=True)  # NCHW or no gradient: returned as is
    assert dense_gradient(plain) is plain and dense_gradient(skip) is skip


def test_the_swap_replaces_element_dropout_only() -> None:
    net = nn.Sequential(nn.Dropout(0.3), nn.Sequential(FeatureDropout(0.5), nn.Dropout2d(0.5)), nn.Conv2d(3, 3, 1))
    assert use_uniform_mask_dropout(net) == 2
    assert [type(m) for m in net.modules() if isinstance(m, nn.Dropout | nn.Dropout2d)] == [
        UniformMaskDropout, UniformMaskDropout, nn.Dropout2d
    ]  # fmt: skip
    assert [m.p for m in net.modules() if isinstance(m, UniformMaskDropout)] == [0.3, 0.5]


def test_apply_performance_follows_cpu_dropout(tmp_path: Path) -> None:
    cfg = compose_config(["method=uaps"], tmp_path)
    assert cfg.performance.cpu_dropout == "uniform_mask"  # the default
    fast = apply_performance(build_module(cfg), cfg.performance)
    types = {type(m) for m in fast.modules() if isinstance(m, nn.Dropout)}
    assert types == {UniformMaskDropout}  # the U-Net's dropout and UAPS's dropout perturbation
    native = apply_performance(build_module(cfg), OmegaConf.merge(cfg.performance, {"cpu_dropout": "native"}))
    assert UniformMaskDropout not in {type(m) for m in native.modules()}
    with pytest.raises(ConfigError, match=r"performance.cpu_dropout='fast' must be one of"):
        apply_performance(build_module(cfg), OmegaConf.merge(cfg.performance, {"cpu_dropout": "fast"}))


def test_a_run_trains_with_the_swapped_dropout_and_writes_its_wall_clock(make_cfg, probe) -> None:
    cfg = make_cfg()
    results = train(cfg)
    assert probe.dropout_types == {UniformMaskDropout}
    figures = json.loads((Path(cfg.paths.output_dir) / "wall_clock.json").read_text())
    assert figures["steps"] == results["steps"] > 0
    parts = figures["step_seconds"] + figures["validation_seconds"] + figures["other_seconds"]
    assert parts == pytest.approx(figures["fit_seconds"], abs=0.01)
    assert figures["validation_seconds"] > 0 and 0 < figures["share_outside_steps"] < 1


def test_native_dropout_is_kept_when_asked(make_cfg, probe) -> None:
    train(make_cfg("performance.cpu_dropout=native"))
    assert probe.dropout_types == {nn.Dropout}


def test_auto_loader_workers_are_none_inside_a_joblib_multirun(monkeypatch: pytest.MonkeyPatch) -> None:
    from semiseg import sweeps
    from semiseg.data.datamodule import resolve_num_workers

    monkeypatch.setattr(sweeps, "parallel_jobs", lambda: 2)
    assert resolve_num_workers("auto") == 0
    assert resolve_num_workers(3) == 3  # an explicit number is kept
    monkeypatch.setattr(sweeps, "parallel_jobs", lambda: 1)
    monkeypatch.setattr("os.cpu_count", lambda: 3)
    assert resolve_num_workers("auto") == 2
