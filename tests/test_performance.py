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
from semiseg.models.perturbations import FeatureDropout, UniformMaskDropout, use_uniform_mask_dropout
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
