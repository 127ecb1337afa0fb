"""Export a trained model for deployment: ``python -m semiseg.export ckpt=PATH format=onnx|torchscript``.

Writes, into this command's output directory (``outputs/export/<timestamp>/``, or ``output_dir=...``):

* ``model.onnx`` (``format=onnx``; ONNX Runtime is the optional ``deploy`` extra) or ``model.pt``
  (``format=torchscript``): the **inference network only** (for UAPS: encoder + main decoder; auxiliary
  decoders, EMA teachers, second networks and memory banks stay behind), float32, input ``image``
  ``(B, C, H, W)`` normalised as ``model.json`` says, output ``logits`` ``(B, num_classes, H, W)``;
* ``model.json``: the model card (:func:`semiseg.predict.model_card`): classes, normalisation, the input size or
  the sliding-window settings of a model trained on crops, and the training run's identity.

Before anything is written, the exported network is compared with the checkpoint's on a batch of
``parity_batch`` random normalised images at the input size: the largest absolute difference of the logits is
printed and must not exceed ``tolerance`` (1e-4), else the command exits with code 2 and writes nothing. A
checkpoint whose weights or outputs are not finite (NaN/Inf) is refused the same way.
``python -m semiseg.evaluate ckpt=<dir>/model.onnx input_dir=FOLDER`` then predicts a folder from the export.
"""

from __future__ import annotations

import logging
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from omegaconf import DictConfig
from torch import nn

from semiseg import predict
from semiseg.config import CONFIG_DIR
from semiseg.errors import ConfigError, SemiSegError, exit_on_user_error, run_hydra_app
from semiseg.evaluate import dataset_config, find_run_config, load_checkpoint, load_module
from semiseg.io import atomic_write_json

log = logging.getLogger("semiseg.export")

FORMATS = {"onnx": "model.onnx", "torchscript": "model.pt"}
ONNX_EXPORTERS = ("torchscript", "dynamo")


class ExportError(SemiSegError):
    """The exported model does not reproduce the checkpoint, or the checkpoint is not finite."""


def check_finite(network: nn.Module, checkpoint_path: Path) -> None:
    """Refuse a network with a NaN/Inf parameter or buffer, naming the first one."""
    for name, tensor in [*network.named_parameters(), *network.named_buffers()]:
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ExportError(
                f"ckpt={checkpoint_path}: '{name}' holds NaN/Inf values, so the model is not finite; export a "
                "checkpoint from before the fault (e.g. the run's best-step<k>.ckpt)"
            )


def write_onnx(network: nn.Module, example: torch.Tensor, path: Path, opset: int, exporter: str) -> None:
    """``network`` as ONNX at ``path``: input ``image``, output ``logits``, batch dimension dynamic."""
    if exporter not in ONNX_EXPORTERS:
        raise ConfigError(f"onnx_exporter={exporter!r} must be one of {list(ONNX_EXPORTERS)}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript-based exporter announces its deprecation
        # the dynamo exporter names dynamic sizes by dimension objects, the TorchScript-based one by axis names
        if exporter == "dynamo":
            dynamic = {"dynamic_shapes": {"image": {0: torch.export.Dim("batch")}}}
        else:
            dynamic = {"dynamic_axes": {"image": {0: "batch"}, "logits": {0: "batch"}}}
        torch.onnx.export(
            network,
            (example,),
            str(path),
            input_names=["image"],
            output_names=["logits"],
            opset_version=opset,
            dynamo=exporter == "dynamo",
            **dynamic,
        )


def write_torchscript(network: nn.Module, example: torch.Tensor, path: Path) -> None:
    """``network`` traced to TorchScript at ``path``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(network, example, check_trace=False)
        torch.jit.save(traced, str(path))


def parity(reference: torch.Tensor, exported: torch.Tensor) -> float:
    """The largest absolute difference between two logit tensors (``inf`` if either is not finite)."""
    if not (bool(torch.isfinite(reference).all()) and bool(torch.isfinite(exported).all())):
        return float("inf")
    return float((reference - exported).abs().max())


@exit_on_user_error
def export(cfg: DictConfig) -> dict[str, Any]:
    """Export the checkpoint ``cfg.ckpt``; returns the model card written as ``model.json``."""
    if cfg.get("ckpt") in (None, "", "???"):
        raise ConfigError("ckpt=PATH is required: the .ckpt file of a run, e.g. ckpt=outputs/.../checkpoints/last.ckpt")
    if cfg.format not in FORMATS:
        raise ConfigError(f"format={cfg.format!r} must be one of {list(FORMATS)}")
    checkpoint_path = Path(cfg.ckpt)
    checkpoint = load_checkpoint(checkpoint_path, bool(cfg.trust_checkpoint))
    run_cfg, _ = find_run_config(checkpoint_path)
    module = load_module(checkpoint_path, checkpoint, run_cfg).float()
    if cfg.get("dataset") is None and run_cfg is None:
        raise ConfigError(
            "no run config.yaml beside the checkpoint: say which data it was trained on with dataset=NAME"
        )
    dataset_cfg, _ = dataset_config(cfg, run_cfg)
    card = predict.model_card(module, dataset_cfg, run_cfg, checkpoint_path)
    network = module.inference_network.eval()
    check_finite(network, checkpoint_path)

    height, width = card["input"]["size"]
    generator = torch.Generator().manual_seed(int(cfg.seed))
    batch = torch.randn(int(cfg.parity_batch), module.in_channels, height, width, generator=generator)
    with torch.no_grad():
        reference = network(batch)
    if not bool(torch.isfinite(reference).all()):
        raise ExportError(f"ckpt={checkpoint_path}: the model's logits are NaN/Inf on a test batch; it is not finite")

    output_dir = Path(cfg.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    target = output_dir / FORMATS[cfg.format]
    descriptor, temporary_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=target.suffix, dir=output_dir)
    os.close(descriptor)
    temporary = Path(temporary_name)
    try:
        with torch.no_grad():
            if cfg.format == "onnx":
                write_onnx(network, batch, temporary, int(cfg.opset), str(cfg.onnx_exporter))
                session = predict.onnx_session(temporary)
                exported = torch.from_numpy(session.run(None, {"image": batch.numpy().astype(np.float32)})[0])
            else:
                write_torchscript(network, batch, temporary)
                exported = predict.load_torchscript(temporary)(batch)
        difference = parity(reference, exported)
        print(
            f"parity: max |logit difference| = {difference:.3e} (tolerance {float(cfg.tolerance):.0e}) over "
            f"{int(cfg.parity_batch)} images of {height}x{width}",
            flush=True,
        )
        if not difference <= float(cfg.tolerance):
            raise ExportError(
                f"{cfg.format} export of ckpt={checkpoint_path} differs from the checkpoint by {difference:.3e} > "
                f"tolerance={float(cfg.tolerance):.0e}; nothing written (try the other format, or another opset=)"
            )
        os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)
    card = {
        **card,
        "format": cfg.format,
        "file": target.name,
        "parity": {"max_abs_logit_difference": difference, "tolerance": float(cfg.tolerance)},
    }
    atomic_write_json(output_dir / predict.CARD_FILE, card)
    log.info("exported %s and %s", target, output_dir / predict.CARD_FILE)
    return card


_task_started = False


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="export")
def main(cfg: DictConfig) -> None:
    global _task_started
    _task_started = True
    export(cfg)


def cli() -> None:
    run_hydra_app(main, lambda: _task_started)


if __name__ == "__main__":
    cli()
