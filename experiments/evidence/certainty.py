"""Do UAPS's certainty weights ``exp(−u_k)`` put less weight on its wrong pseudo-labels? (issue 18, section 4)

    SEMISEG_DATA_DIR=... python experiments/evidence/certainty.py RUN_DIR [RUN_DIR ...] [--checkpoint best|last]

For each UAPS run directory of the evidence sweep: its checkpoint (the best-validation one by default), over every
image of the run's unlabeled split with its hidden mask (the training never saw these masks; they are read here
only to score), at the run's 64² evaluation preprocessing:

* the pseudo-label ``argmax Σ_k p_k / K`` (the expectation of the dynamic mix) and whether it is right;
* the certainty weight of each pixel, ``mean_k exp(−u_k / τ)`` with ``u_k = KL(p̄ ‖ p_k)``, as the loss applies it
  (``τ`` = ``method.certainty_temperature``, the paper's 1.0; ``--temperatures`` scores other values of it on the
  same forward passes: what a sharper weight would do to these pseudo-labels, without training).

The decoders run with their training perturbations on (noise, dropout, feature drop; encoder dropout on, as in a
training step) and BatchNorm on its running statistics (a training step would use the batch's); one seeded draw.

Printed per run and pooled: the share of wrong pseudo-label pixels, the mean weight on right and on wrong pixels,
the share of the loss's total weight that lands on wrong pixels (against the share of wrong pixels: equal means
the weighting does not filter at all), and the AUROC of the weight as a detector of a right pseudo-label (0.5:
no information), over all pixels and over the pixels whose hidden label is a defect, and the mean weight (how
much of the loss's pull remains). ``--out FILE`` writes the figures as JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from torch import nn

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "src"))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from semiseg.evaluate import build_datamodule, find_run_config, load_checkpoint, load_module  # noqa: E402
from semiseg.methods.uaps import UAPS, decoder_uncertainty, mixed_pseudo_label, mixing_weights  # noqa: E402

BINS = 2000  # histogram bins of the weight in [0, 1] for the AUROC (exact up to ties within a bin)


class Tally:
    """Histograms of the certainty weight over right and wrong pseudo-label pixels."""

    def __init__(self) -> None:
        self.right = np.zeros(BINS, dtype=np.int64)
        self.wrong = np.zeros(BINS, dtype=np.int64)
        self.weight_right = 0.0
        self.weight_wrong = 0.0

    def add(self, weight: torch.Tensor, right: torch.Tensor) -> None:
        bins = (weight.clamp(0, 1) * (BINS - 1)).round().long()
        self.right += np.bincount(bins[right].numpy(), minlength=BINS)
        self.wrong += np.bincount(bins[~right].numpy(), minlength=BINS)
        self.weight_right += float(weight[right].sum())
        self.weight_wrong += float(weight[~right].sum())

    def merge(self, other: Tally) -> None:
        self.right += other.right
        self.wrong += other.wrong
        self.weight_right += other.weight_right
        self.weight_wrong += other.weight_wrong

    def figures(self) -> dict[str, float]:
        right, wrong = int(self.right.sum()), int(self.wrong.sum())
        total_weight = self.weight_right + self.weight_wrong
        # AUROC = P(weight of a right pixel > weight of a wrong one) + half the ties (within one bin)
        wrong_below = np.cumsum(self.wrong) - self.wrong
        auroc = float((self.right * (wrong_below + 0.5 * self.wrong)).sum()) / max(right * wrong, 1)
        return {
            "pixels": right + wrong,
            "wrong_share": wrong / max(right + wrong, 1),
            "mean_weight_right": self.weight_right / max(right, 1),
            "mean_weight_wrong": self.weight_wrong / max(wrong, 1),
            "weight_share_on_wrong": self.weight_wrong / total_weight if total_weight else math.nan,
            "mean_weight": total_weight / max(right + wrong, 1),
            "auroc": auroc if right and wrong else math.nan,
        }


def batchnorm_eval(module: nn.Module) -> None:
    for layer in module.modules():
        if isinstance(layer, nn.modules.batchnorm._BatchNorm):
            layer.eval()


@torch.no_grad()
def analyse(
    run_dir: Path, which: str, batch_size: int, seed: int, temperatures: list[float]
) -> dict[str, dict[str, float]]:
    checkpoints = sorted((run_dir / "checkpoints").glob("best-step*.ckpt")) if which == "best" else []
    path = checkpoints[-1] if checkpoints else run_dir / "checkpoints" / "last.ckpt"
    run_cfg, found_dir = find_run_config(path)
    module = load_module(path, load_checkpoint(path, trust=False), run_cfg)
    if not isinstance(module, UAPS):
        raise SystemExit(f"{run_dir}: not a UAPS run ({type(module).__name__})")
    settings = OmegaConf.create({"dataset": None, "split_seed": None, "batch_size": batch_size, "num_workers": 0})
    datamodule = build_datamodule(settings, run_cfg, found_dir)
    dataset = datamodule.part_dataset("unlabeled", views=datamodule.eval_views, with_masks=True)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
    module.train()
    batchnorm_eval(module)
    torch.manual_seed(seed)
    background, ignore = module.val_metrics.background_index, module.ignore_index
    equal_weights = mixing_weights(module.num_decoders, "average")  # the expectation of the dynamic mix
    tallies = {f"{region}, τ={t:g}": Tally() for t in temperatures for region in ("all pixels", "defect pixels")}
    for batch in loader:
        logits = module.net.forward_all(batch["image"])
        log_probabilities = torch.stack([item.float().log_softmax(dim=1) for item in logits])  # (K, B, C, H, W)
        uncertainty = decoder_uncertainty(log_probabilities)  # (K, B, H, W)
        pseudo_label = mixed_pseudo_label(log_probabilities.exp(), equal_weights)
        mask = batch["mask"]
        valid = mask != ignore
        right = pseudo_label == mask
        defect = valid & (mask != background)
        for temperature in temperatures:
            weight = torch.exp(-uncertainty / temperature).mean(dim=0)  # (B, H, W)
            tallies[f"all pixels, τ={temperature:g}"].add(weight[valid], right[valid])
            tallies[f"defect pixels, τ={temperature:g}"].add(weight[defect], right[defect])
    return {
        "checkpoint": str(path.relative_to(run_dir)),
        "images": len(dataset),
        **{name: tally.figures() for name, tally in tallies.items()},
        "_tallies": tallies,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="UAPS run directories")
    parser.add_argument("--checkpoint", choices=["best", "last"], default="best")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0, help="seed of the perturbation draws")
    parser.add_argument("--temperatures", type=float, nargs="+", default=[1.0], help="τ of exp(−u/τ)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    results: dict[str, dict] = {}
    pooled: dict[str, Tally] = {}
    for run_dir in args.runs:
        result = analyse(run_dir, args.checkpoint, args.batch_size, args.seed, args.temperatures)
        for name, tally in result.pop("_tallies").items():
            pooled.setdefault(name, Tally()).merge(tally)
        results[run_dir.name] = result
    results["pooled"] = {name: tally.figures() for name, tally in pooled.items()}
    print("run | pixels | wrong share | mean weight right / wrong | weight share on wrong | AUROC | mean weight")
    for run, result in results.items():
        for name in pooled:
            f = result[name]
            print(
                f"{run} ({name}) | {f['pixels']:,} | {f['wrong_share']:.4f} | {f['mean_weight_right']:.4f} / "
                f"{f['mean_weight_wrong']:.4f} | {f['weight_share_on_wrong']:.4f} | {f['auroc']:.4f} | "
                f"{f['mean_weight']:.4f}"
            )
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
