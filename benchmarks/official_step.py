"""semiseg's UAPS training step against the official UAPS step, paired (a benchmark, not a test).

    python benchmarks/official_step.py [--sizes 128 256] [--steps 6 2] [--batch 8] [--formats nchw channels_last]
                                       [--weighting pixel|batch] [--profile N] [--out NAME]

The official step (github.com/djene-mengistu/UAPS, ``UAPS_train.py`` with ``UNet_UAPS`` and
``utilities/pytorch_losses.dice_loss``) is re-implemented here from its computation, in plain PyTorch:

* two forward passes of the four-decoder U-Net (labeled batch, unlabeled batch); the encoder runs once per pass,
  the main decoder sees clean features, auxiliary decoder 1 feature noise ``x + x·U(−0.3, 0.3)`` (one ``(C, H, W)``
  draw per level), decoder 2 dropout 0.5, decoder 3 the attention feature drop with a NumPy threshold draw;
* supervised: per decoder ``0.5 (CE + Dice)`` with batch-mean CE and the code's Dice
  ``1 − mean_c 2 Σ p·y / (Σ (p + y) + 1e-7)`` (softmax recomputed inside, one-hot by indexing an identity matrix),
  averaged over the four decoders;
* uncertainty ``u_k = Σ_c KLDiv(log_softmax(logits_k), p̄)`` with ``p̄`` the mean softmax (not detached),
  ``L_un = mean(mean_k u_k)``; pseudo-label ``argmax Σ λ_k p_k`` (detached) with ``λ ~ Dirichlet(1, 1, 1, 1)``
  from NumPy; ``L_ps = mean_k mean(0.5 (CE + Dice)(logits_k, ŷ) · exp(−u_k))`` — a batch-mean loss times the mean
  of ``exp(−u_k)``;
* ``L = L_sup + w1 L_ps + w2 L_un`` with the ramps at their full value (0.1, 0.1), Adam (lr 1e-3),
  ``zero_grad``, ``backward``, ``step``; the network in NCHW (the official code has no ``channels_last``).

semiseg's step is ``UAPS.training_losses`` (method defaults: ``uncertainty_weighting: pixel``, or ``--weighting
batch``, the official variant) + ``backward`` + Adam, with the ramps at their full value, with semiseg's fast
paths (``semiseg.runner.apply_performance``): in NCHW and in ``channels_last`` (semiseg's default), with
``performance.cpu_dropout=uniform_mask`` (the default; ``--cpu-dropout native`` for ``F.dropout``); the official
step keeps ``nn.Dropout``. Both start from the same weights (the official network is built from deep
copies of semiseg's encoder and decoders) and train on the same batch (random images, 4 classes, ``batch``
labeled + ``batch`` unlabeled). Within one pair the two steps alternate and which one runs first alternates too,
so a change in the machine's load during the measurement hits both alike. Printed per size and memory format:
the median step time of each, the ratio of the medians, and the spread (min–max of the per-pair ratios).
``--profile N`` instead prints the N most expensive operators of semiseg's step (``torch.profiler``, CPU).
Results also go to ``bench_out/<out>.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from uaps_step import make_batch  # noqa: E402  (the same random batch as the step benchmark)

from semiseg.methods.uaps import UAPS  # noqa: E402
from semiseg.runner import apply_performance  # noqa: E402

NUM_CLASSES = 4
IN_CHANNELS = 3
NUM_AUX = 3  # the official network has exactly three auxiliary decoders
LEARNING_RATE = 1e-3
W1 = W2 = 0.1  # both consistency weights after their ramp-up (the official defaults)
OFFICIAL_DICE_EPS = 1e-7
NOISE_RANGE = 0.3
DROPOUT_P = 0.5
DROP_THRESHOLD = (0.7, 0.9)
MODEL = {"_target_": "semiseg.models.unet.UNet", "name": "unet"}


# ---- the official step, reproduced from its computation ------------------------------------------------------


class OfficialUAPSNet(nn.Module):
    """Encoder + main decoder + three auxiliary decoders with the official forward pass and perturbations.

    Built from deep copies of a semiseg :class:`~semiseg.models.multi_decoder.MultiDecoderNetwork` (the layers of
    ``UNet_UAPS`` and semiseg's U-Net are the same: conv-BN-LeakyReLU blocks, 1x1 conv + bilinear x2 upsampling).
    """

    def __init__(self, semiseg_net: nn.Module) -> None:
        super().__init__()
        self.encoder = copy.deepcopy(semiseg_net.network.encoder)
        self.decoders = nn.ModuleList(
            [copy.deepcopy(semiseg_net.network.decoder), *copy.deepcopy(semiseg_net.aux_decoders)]
        )

    @staticmethod
    def noise(x: torch.Tensor) -> torch.Tensor:
        draw = torch.distributions.Uniform(-NOISE_RANGE, NOISE_RANGE).sample(x.shape[1:]).unsqueeze(0)
        return x * draw + x

    @staticmethod
    def dropout(x: torch.Tensor) -> torch.Tensor:
        return F.dropout(x, DROPOUT_P)  # the code's functional dropout: always on

    @staticmethod
    def feature_drop(x: torch.Tensor) -> torch.Tensor:
        attention = x.mean(dim=1, keepdim=True)
        peak = attention.view(x.shape[0], -1).max(dim=1, keepdim=True).values
        threshold = (peak * np.random.uniform(*DROP_THRESHOLD)).view(-1, 1, 1, 1).expand_as(attention)
        return x.mul((attention < threshold).float())

    def forward(self, image: torch.Tensor) -> list[torch.Tensor]:
        """``image (B, 3, H, W)`` -> four logits ``(B, 4, H, W)``: main, noise, dropout, feature drop."""
        features = self.encoder(image)
        outputs = [self.decoders[0](features)]
        for decoder, perturb in zip(self.decoders[1:], (self.noise, self.dropout, self.feature_drop), strict=True):
            outputs.append(decoder([perturb(level) for level in features]))
        return outputs


def official_dice_loss(target: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """The code's Dice: ``target (B, 1, H, W)``, ``logits (B, C, H, W)`` -> ``1 − mean_c 2I_c / (card_c + eps)``."""
    num_classes = logits.shape[1]
    one_hot = torch.eye(num_classes)[target.squeeze(1)].permute(0, 3, 1, 2).float().type(logits.type())
    probabilities = F.softmax(logits, dim=1)
    dims = (0, 2, 3)
    intersection = torch.sum(probabilities * one_hot, dims)
    cardinality = torch.sum(probabilities + one_hot, dims)
    return 1 - (2.0 * intersection / (cardinality + OFFICIAL_DICE_EPS)).mean()


def official_ce_dice(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``0.5 (CE + Dice)`` of the code: batch-mean cross-entropy and its Dice."""
    return 0.5 * (F.cross_entropy(logits, target) + official_dice_loss(target.unsqueeze(1), logits))


def official_loss(net: OfficialUAPSNet, batch: dict) -> torch.Tensor:
    """The official loop body's loss for one labeled and one unlabeled batch (the ramps at their full value)."""
    labeled_logits = net(batch["labeled"]["image"])
    unlabeled_logits = net(batch["unlabeled"]["image"])
    softmaxes = [torch.softmax(logits, dim=1) for logits in unlabeled_logits]
    mask = batch["labeled"]["mask"]
    supervised = sum(official_ce_dice(logits, mask) for logits in labeled_logits) / len(labeled_logits)
    mean_prediction = sum(softmaxes) / len(softmaxes)
    variances = [
        F.kl_div(F.log_softmax(logits, dim=1), mean_prediction, reduction="none").sum(dim=1)
        for logits in unlabeled_logits
    ]
    uncertainty_loss = torch.mean(sum(variances) / len(variances))
    mix = np.random.dirichlet(np.ones(len(softmaxes)))
    pseudo_label = torch.argmax(sum(float(w) * p.detach() for w, p in zip(mix, softmaxes, strict=True)), dim=1)
    pseudo_losses = [
        torch.mean(official_ce_dice(logits, pseudo_label) * torch.exp(-variance))
        for logits, variance in zip(unlabeled_logits, variances, strict=True)
    ]
    pseudo_loss = sum(pseudo_losses) / len(pseudo_losses)
    return supervised + W1 * pseudo_loss + W2 * uncertainty_loss


# ---- the two steps ---------------------------------------------------------------------------------------------


def build_semiseg(weighting: str) -> UAPS:
    """semiseg's UAPS with the method defaults, ``rampup_length=0`` (full loss weights, as late in training)."""
    module = UAPS(
        num_aux_decoders=NUM_AUX,
        uncertainty_weighting=weighting,
        rampup_length=0,
        name="uaps",
        model=MODEL,
        class_names=[f"class{i}" for i in range(NUM_CLASSES)],
        in_channels=IN_CHANNELS,
        optimizer={"_target_": "torch.optim.Adam", "_partial_": True, "lr": LEARNING_RATE},
    )
    return module.train()


def make_step(loss_of: Callable[[dict], torch.Tensor], optimizer: torch.optim.Optimizer) -> Callable[[dict], None]:
    def step(batch: dict) -> None:
        optimizer.zero_grad(set_to_none=True)
        loss_of(batch).backward()
        optimizer.step()

    return step


def semiseg_step(module: UAPS) -> Callable[[dict], None]:
    return make_step(lambda b: module.training_losses(b["labeled"], b["unlabeled"])[0], module.configure_optimizers())


def official_step(net: OfficialUAPSNet) -> Callable[[dict], None]:
    return make_step(lambda b: official_loss(net, b), torch.optim.Adam(net.parameters(), lr=LEARNING_RATE))


def paired_times(steps: dict[str, Callable[[dict], None]], batch: dict, pairs: int) -> dict[str, list[float]]:
    """Seconds of each step, ``pairs`` times each; the order inside a pair alternates. One warm-up step each."""
    for step in steps.values():
        step(batch)
    times: dict[str, list[float]] = {name: [] for name in steps}
    names = list(steps)
    for index in range(pairs):
        for name in names if index % 2 == 0 else reversed(names):
            started = time.perf_counter()
            steps[name](batch)
            times[name].append(time.perf_counter() - started)
    return times


def semiseg_performance(memory_format: str, cpu_dropout: str) -> DictConfig:
    """semiseg's ``performance`` settings for the step: the memory format and the CPU dropout (no compile)."""
    return OmegaConf.create({"channels_last": memory_format == "channels_last", "cpu_dropout": cpu_dropout})


def measure(size: int, pairs: int, batch_size: int, memory_format: str, weighting: str, cpu_dropout: str) -> dict:
    torch.manual_seed(0)
    module = build_semiseg(weighting)
    official = OfficialUAPSNet(module.net).train()  # copied before semiseg's fast paths change the network
    module = apply_performance(module, semiseg_performance(memory_format, cpu_dropout))
    batch = make_batch(batch_size, size)
    times = paired_times({"semiseg": semiseg_step(module), "official": official_step(official)}, batch, pairs)
    ratios = [s / o for s, o in zip(times["semiseg"], times["official"], strict=True)]
    semiseg, official_median = statistics.median(times["semiseg"]), statistics.median(times["official"])
    return {
        "size": size,
        "memory_format": memory_format,
        "pairs": pairs,
        "semiseg_median_s": round(semiseg, 4),
        "official_median_s": round(official_median, 4),
        "ratio": round(semiseg / official_median, 3),
        "pair_ratio_min": round(min(ratios), 3),
        "pair_ratio_max": round(max(ratios), 3),
        "semiseg_s": [round(t, 4) for t in times["semiseg"]],
        "official_s": [round(t, 4) for t in times["official"]],
    }


def profile(size: int, batch_size: int, memory_format: str, weighting: str, cpu_dropout: str, rows: int) -> None:
    """The ``rows`` most expensive operators (self CPU time) of two semiseg steps."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    module = apply_performance(build_semiseg(weighting), semiseg_performance(memory_format, cpu_dropout))
    batch = make_batch(batch_size, size)
    step = semiseg_step(module)
    step(batch)
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(2):
            step(batch)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--steps", type=int, nargs="+", default=[6, 2], help="timed pairs per size")
    parser.add_argument("--batch", type=int, default=8, help="labeled and unlabeled images per step, each")
    parser.add_argument("--formats", nargs="+", choices=["nchw", "channels_last"], default=["nchw", "channels_last"])
    parser.add_argument("--weighting", choices=["pixel", "batch"], default="pixel", help="semiseg's option")
    parser.add_argument(
        "--cpu-dropout",
        choices=["uniform_mask", "native"],
        default="uniform_mask",
        help="semiseg's performance.cpu_dropout (default: the config's default, uniform_mask)",
    )
    parser.add_argument("--profile", type=int, default=0, help="print the N costliest operators instead")
    parser.add_argument("--out", default="official_step")
    args = parser.parse_args()
    if args.profile:
        for size in args.sizes:
            for memory_format in args.formats:
                print(f"semiseg UAPS step, {size}², {memory_format}, weighting={args.weighting}")
                profile(size, args.batch, memory_format, args.weighting, args.cpu_dropout, args.profile)
        return
    pairs = dict(zip(args.sizes, args.steps + args.steps[-1:] * len(args.sizes), strict=False))
    figures = {
        "batch": f"{args.batch}+{args.batch}",
        "weighting": args.weighting,
        "cpu_dropout": args.cpu_dropout,
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "results": [],
    }
    print(
        f"UAPS step: semiseg (uncertainty_weighting={args.weighting}, cpu_dropout={args.cpu_dropout}) vs official, "
        f"batch {args.batch}+{args.batch}, {NUM_CLASSES} classes, {torch.get_num_threads()} threads"
    )
    for size in args.sizes:
        for memory_format in args.formats:
            row = measure(size, pairs[size], args.batch, memory_format, args.weighting, args.cpu_dropout)
            figures["results"].append(row)
            print(
                f"  {size}² {memory_format:<13} semiseg {row['semiseg_median_s']:.3f} s  "
                f"official {row['official_median_s']:.3f} s  ratio {row['ratio']:.3f}  "
                f"(per-pair {row['pair_ratio_min']:.3f}-{row['pair_ratio_max']:.3f}, {row['pairs']} pairs)",
                flush=True,
            )
    out = ROOT / "bench_out"
    out.mkdir(exist_ok=True)
    (out / f"{args.out}.json").write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
