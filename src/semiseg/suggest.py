"""Which images to label next: ``python -m semiseg.suggest ckpt=PATH k=20 [input_dir=FOLDER]``.

Ranks the run's unlabeled images (or the images of ``input_dir``) by the model's uncertainty and writes, into
this command's output directory:

* ``suggestions.csv``: every image with ``id, score, rank`` and the score's parts (``entropy``, ``margin``,
  ``method`` where computed, ``defect_share`` predicted); ranks 1..k are the suggestion;
* ``suggestions.png``: a contact sheet of the top k, each image beside its uncertainty map (bright: uncertain).

Per-pixel uncertainty ``u (H, W)`` at the image's own size (the same preprocessing as prediction, sliding window
included), reduced to one score per image by ``suggest.reduce`` (``mean`` over pixels, or ``top``: the mean of
the ``suggest.top_share`` most uncertain pixels, which tiny defects do not drown in):

* ``entropy``: ``-Σ_c p_c log p_c`` of the inference network's softmax;
* ``margin``: ``1 - (p_(1) - p_(2))``, one minus the gap between the two most probable classes;
* ``method``: the disagreement of the method's own predictors, ``mean_k KL(p̄ ‖ p_k)`` with ``p̄ = mean_k p_k``
  (the UAPS uncertainty): UAPS and CCT over their decoders, Mean Teacher, UA-MT and U2PL between student and
  EMA teacher, CPS and DCT between their two networks, UCC between its two heads; a method with none of these
  (supervised, FixMatch, UniMatch) gets ``suggest.mc_samples`` Monte-Carlo dropout passes (dropout active,
  BatchNorm in eval mode; with ``k`` passes the score is the mutual information of BALD).

``suggest.diversity=true`` avoids near-duplicates: among the ``suggest.pool_factor * k`` highest scores, the
first pick is the highest score and every next pick the candidate whose encoder features (global mean of the
deepest feature map, L2-normalised) are farthest from all picks so far (greedy farthest point, cosine distance).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import hydra
import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from semiseg import predict
from semiseg.config import CONFIG_DIR
from semiseg.data.datasets.base import Sample, read_image
from semiseg.errors import ConfigError, exit_on_user_error, run_hydra_app
from semiseg.evaluate import build_datamodule, dataset_config, find_run_config, load_checkpoint, load_module
from semiseg.io import atomic_write_json
from semiseg.methods.uaps import LOG_EPS, decoder_uncertainty
from semiseg.models.multi_decoder import MultiDecoderNetwork

log = logging.getLogger("semiseg.suggest")

SCORES = ("entropy", "margin", "method")
REDUCTIONS = ("mean", "top")
SUGGESTIONS_CSV = "suggestions.csv"
SUGGESTIONS_PNG = "suggestions.png"
THUMBNAIL_HEIGHT = 128  # pixels of each image in the contact sheet
SHEET_COLUMNS = 4  # image + map pairs per row of the contact sheet


@dataclass(frozen=True)
class SuggestSettings:
    """``suggest.*``: the score, its reduction over pixels, diversity and Monte-Carlo passes."""

    score: str = "method"
    reduce: str = "mean"
    top_share: float = 0.01
    diversity: bool = False
    pool_factor: int = 3
    mc_samples: int = 8

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | None) -> SuggestSettings:
        settings = cls(**dict(config or {}))
        if settings.score not in SCORES:
            raise ConfigError(f"suggest.score={settings.score!r} must be one of {list(SCORES)}")
        if settings.reduce not in REDUCTIONS:
            raise ConfigError(f"suggest.reduce={settings.reduce!r} must be one of {list(REDUCTIONS)}")
        if not 0 < settings.top_share <= 1:
            raise ConfigError(f"suggest.top_share={settings.top_share} must lie in (0, 1], e.g. 0.01")
        if settings.pool_factor < 1 or settings.mc_samples < 2:
            raise ConfigError(
                f"suggest.pool_factor={settings.pool_factor} must be >= 1 and suggest.mc_samples="
                f"{settings.mc_samples} >= 2"
            )
        return settings


@dataclass
class Scored:
    """One image's scores, its uncertainty map ``(H, W)`` and its feature vector ``(D,)``."""

    id: str
    score: float
    parts: dict[str, Any]
    uncertainty: np.ndarray
    features: np.ndarray
    image: np.ndarray = field(repr=False)
    rank: int = 0


# ---- per-pixel uncertainty -------------------------------------------------------------------------------
def entropy_map(probabilities: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W)`` softmax -> ``(B, H, W)`` predictive entropy in nats."""
    return -(probabilities * probabilities.clamp_min(LOG_EPS).log()).sum(dim=1)


def margin_map(probabilities: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W)`` softmax -> ``(B, H, W)`` ``1 - (p_(1) - p_(2))``."""
    top = probabilities.topk(2, dim=1).values
    return 1 - (top[:, 0] - top[:, 1])


class MCDropout:
    """Dropout layers in training mode (BatchNorm untouched) while the context is active."""

    def __init__(self, network: nn.Module) -> None:
        self.dropouts = [m for m in network.modules() if isinstance(m, nn.modules.dropout._DropoutNd)]

    def __enter__(self) -> MCDropout:
        for module in self.dropouts:
            module.train()
        return self

    def __exit__(self, *exc: object) -> None:
        for module in self.dropouts:
            module.eval()


@dataclass(frozen=True)
class Members:
    """The method's own predictors whose disagreement is its uncertainty.

    ``all(x)`` returns the logits of every member on ``x (B, C, H, W)`` (shared work done once); ``one(x, k)``
    those of member ``k`` only (for the sliding window, which runs one member at a time over the tiles).
    """

    name: str
    count: int
    all: Callable[[torch.Tensor], list[torch.Tensor]]
    one: Callable[[torch.Tensor, int], torch.Tensor]


def method_members(module: Any, mc_samples: int) -> Members:
    """The :class:`Members` of ``module``'s method (see the module docstring)."""
    net = getattr(module, "net", None)
    if isinstance(net, MultiDecoderNetwork):  # UAPS, CCT: every decoder on the shared encoder
        return Members("decoders", net.num_decoders, net.forward_all, lambda x, k: net.forward_all(x)[k])
    networks: list[nn.Module] = []
    teacher = getattr(module, "teacher", None)
    if teacher is not None and net is not None:  # Mean Teacher, UA-MT, U2PL: student against EMA teacher
        networks = [getattr(net, "segmenter", net), getattr(teacher.module, "segmenter", teacher.module)]
        name = "teacher_student"
    elif getattr(module, "net2", None) is not None:  # CPS, DCT
        networks, name = [module.net, module.net2], "two_networks"
    if networks:
        return Members(name, 2, lambda x: [n(x) for n in networks], lambda x, k: networks[k](x))
    if hasattr(module, "both_heads"):  # UCC
        return Members("two_heads", 2, lambda x: list(module.both_heads(x)), lambda x, k: module.both_heads(x)[k])
    network = module.inference_network
    if not any(isinstance(m, nn.modules.dropout._DropoutNd) for m in network.modules()):
        raise ConfigError(
            f"method {module.method_name} has no uncertainty of its own and its network no dropout for "
            "Monte-Carlo passes; use suggest.score=entropy or margin"
        )

    def mc_pass(x: torch.Tensor, k: int = 0) -> torch.Tensor:
        with MCDropout(network):
            return network(x)

    return Members("mc_dropout", mc_samples, lambda x: [mc_pass(x) for _ in range(mc_samples)], mc_pass)


def member_disagreement(members: Members, image: torch.Tensor, window: Any) -> torch.Tensor:
    """``mean_k KL(p̄ ‖ p_k)`` ``(B, H, W)`` of the members' softmax on ``image (B, C, H, W)``."""
    if window is None:
        outputs = members.all(image)
    else:
        outputs = [window(lambda x, k=k: members.one(x, k), image) for k in range(members.count)]
    log_probabilities = torch.stack([logits.float().log_softmax(dim=1) for logits in outputs])
    return decoder_uncertainty(log_probabilities).mean(dim=0)


def encoder_of(module: Any) -> nn.Module | None:
    """The network whose ``encode`` gives the inference network's features (through ensembles and wrappers)."""
    for candidate in (module.inference_network, getattr(module, "net", None)):
        for inner in (candidate, getattr(candidate, "network", None), getattr(candidate, "segmenter", None)):
            if inner is not None and hasattr(inner, "encode"):
                return inner
    return None


def features_of(module: Any, tensor: torch.Tensor, size: Sequence[int]) -> np.ndarray:
    """L2-normalised global mean of the deepest encoder feature map of ``tensor`` resized to ``size``: ``(D,)``
    (the logits' when no encoder is found)."""
    resized = F.interpolate(tensor, size=tuple(int(s) for s in size), mode="bilinear", align_corners=False)
    encoder = encoder_of(module)
    deepest = encoder.encode(resized)[-1] if encoder is not None else module.inference_network(resized)
    vector = deepest.float().mean(dim=(-2, -1))[0]
    return F.normalize(vector, dim=0).cpu().numpy()


def reduce_map(uncertainty: torch.Tensor, settings: SuggestSettings) -> float:
    """A ``(H, W)`` map -> one score: its mean, or the mean of its ``top_share`` largest values."""
    values = uncertainty.flatten()
    if settings.reduce == "top":
        count = max(1, round(values.numel() * settings.top_share))
        values = values.topk(count).values
    return float(values.mean())


@torch.no_grad()
def score_images(
    module: Any, card: Mapping[str, Any], images: Iterable[tuple[str, np.ndarray]], settings: SuggestSettings
) -> list[Scored]:
    """Score every ``(id, image (H, W, C) uint8)`` with ``module``; the preprocessing of ``card``."""
    module.eval()
    predictor = predict.checkpoint_predictor(module, card)
    members = method_members(module, settings.mc_samples) if settings.score == "method" else None
    scored = []
    for image_id, image in images:
        tensor = predictor.network_input(image)
        logits = predictor.window(module.predict_logits, tensor) if predictor.window else module.predict_logits(tensor)
        probabilities = logits.float().softmax(dim=1)
        maps = {"entropy": entropy_map(probabilities)[0], "margin": margin_map(probabilities)[0]}
        if members is not None:
            maps["method"] = member_disagreement(members, tensor, predictor.window)[0]
        parts: dict[str, Any] = {name: reduce_map(value, settings) for name, value in maps.items()}
        prediction = probabilities.argmax(dim=1)[0]
        parts["defect_share"] = float((prediction != predictor.background_index).float().mean())
        if members is not None:
            parts["method_measure"] = members.name
        chosen = maps[settings.score]
        height, width = image.shape[:2]
        uncertainty = F.interpolate(chosen[None, None], size=(height, width), mode="bilinear", align_corners=False)
        scored.append(
            Scored(
                id=image_id,
                score=parts[settings.score],
                parts=parts,
                uncertainty=uncertainty[0, 0].cpu().numpy(),
                features=features_of(module, tensor, card["input"]["size"]),
                image=image,
            )
        )
    return scored


def select(scored: Sequence[Scored], k: int, settings: SuggestSettings) -> list[Scored]:
    """All images ranked (``rank`` 1..N): the k picks first (by score, or greedy farthest point), then the rest
    by score."""
    by_score = sorted(scored, key=lambda s: (-s.score, s.id))
    k = min(k, len(by_score))
    if not settings.diversity or k <= 1:
        picks = by_score[:k]
    else:
        pool = by_score[: settings.pool_factor * k]
        features = np.stack([item.features for item in pool])
        picks_index = [0]
        nearest = 1 - features @ features[0]  # cosine distance to the nearest pick
        while len(picks_index) < k:
            nearest[picks_index] = -np.inf
            index = int(np.argmax(nearest))
            picks_index.append(index)
            nearest = np.minimum(nearest, 1 - features @ features[index])
        picks = [pool[index] for index in picks_index]
    chosen = {id(item) for item in picks}
    ranked = [*picks, *(item for item in by_score if id(item) not in chosen)]
    for rank, item in enumerate(ranked, start=1):
        item.rank = rank
    return ranked


def contact_sheet(picks: Sequence[Scored]) -> np.ndarray:
    """RGB ``(H, W, 3)`` uint8: per pick, the image and its uncertainty map side by side, captioned."""
    tiles = []
    for item in picks:
        height, width = item.image.shape[:2]
        thumb_w = max(1, round(width * THUMBNAIL_HEIGHT / height))
        picture = item.image if item.image.shape[2] == 3 else np.repeat(item.image, 3, axis=2)
        picture = cv2.resize(picture, (thumb_w, THUMBNAIL_HEIGHT), interpolation=cv2.INTER_AREA)
        span = float(item.uncertainty.max() - item.uncertainty.min()) or 1.0
        scaled = ((item.uncertainty - item.uncertainty.min()) / span * 255).astype(np.uint8)
        heat = cv2.cvtColor(cv2.applyColorMap(scaled, cv2.COLORMAP_INFERNO), cv2.COLOR_BGR2RGB)
        heat = cv2.resize(heat, (thumb_w, THUMBNAIL_HEIGHT), interpolation=cv2.INTER_NEAREST)
        tile = np.concatenate([picture, heat], axis=1)
        caption = np.zeros((18, tile.shape[1], 3), dtype=np.uint8)
        cv2.putText(caption, f"{item.rank}. {item.id[:28]} {item.score:.3g}", (2, 13), cv2.FONT_HERSHEY_SIMPLEX,
                    0.4, (255, 255, 255), 1, cv2.LINE_AA)  # fmt: skip
        tiles.append(np.concatenate([caption, tile], axis=0))
    tile_w = max(tile.shape[1] for tile in tiles)
    tiles = [np.pad(tile, ((0, 0), (0, tile_w - tile.shape[1]), (0, 0))) for tile in tiles]
    tiles += [np.zeros_like(tiles[0])] * (-len(tiles) % SHEET_COLUMNS)
    rows = [np.concatenate(tiles[i : i + SHEET_COLUMNS], axis=1) for i in range(0, len(tiles), SHEET_COLUMNS)]
    return np.concatenate(rows, axis=0)


def write_suggestions(ranked: Sequence[Scored], k: int, output_dir: Path) -> None:
    """``suggestions.csv`` (every image) and ``suggestions.png`` (the top k)."""
    rows = [{"id": item.id, "score": item.score, "rank": item.rank, **item.parts} for item in ranked]
    predict.write_csv(output_dir / SUGGESTIONS_CSV, rows)
    predict.write_png(output_dir / SUGGESTIONS_PNG, contact_sheet(ranked[: min(k, len(ranked))]))


# ---- the command ---------------------------------------------------------------------------------------------
def load_images(dataset: Any, samples: Sequence[Sample]) -> Iterable[tuple[str, np.ndarray]]:
    """``(id, image)`` of ``samples`` without their masks."""
    for sample in samples:
        yield sample.id, dataset.load_image(sample)


@exit_on_user_error
def suggest(cfg: DictConfig) -> dict[str, Any]:
    """Rank images for labelling; returns a summary (also ``suggest.json``)."""
    if cfg.get("ckpt") in (None, "", "???"):
        raise ConfigError("ckpt=PATH is required: the .ckpt file of a run, e.g. ckpt=outputs/.../checkpoints/last.ckpt")
    k = cfg.k
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigError(f"k={k!r} must be a positive integer, e.g. k=20")
    settings = SuggestSettings.from_config(cfg.suggest)
    checkpoint_path = Path(cfg.ckpt)
    checkpoint = load_checkpoint(checkpoint_path, bool(cfg.trust_checkpoint))
    run_cfg, run_dir = find_run_config(checkpoint_path)
    module = load_module(checkpoint_path, checkpoint, run_cfg)
    if cfg.get("dataset") is None and run_cfg is None:
        raise ConfigError(
            "no run config.yaml beside the checkpoint: say which data it was trained on with dataset=NAME"
        )
    dataset_cfg, _ = dataset_config(cfg, run_cfg)
    card = predict.model_card(module, dataset_cfg, run_cfg, checkpoint_path)
    if cfg.get("input_dir"):
        paths = predict.list_images(Path(cfg.input_dir))
        images: Iterable[tuple[str, np.ndarray]] = ((p.name, read_image(p, module.in_channels)) for p in paths)
        source = str(cfg.input_dir)
    else:
        datamodule = build_datamodule(cfg, run_cfg, run_dir)
        samples = datamodule.parts["unlabeled"]
        if not samples:
            raise ConfigError("the run has no unlabeled image to rank; give a folder with input_dir=FOLDER")
        images = load_images(datamodule.dataset, samples)
        source = "unlabeled split"
    ranked = select(score_images(module, card, images, settings), k, settings)
    output_dir = Path(cfg.output_dir)
    write_suggestions(ranked, k, output_dir)
    summary = {
        "ckpt": str(checkpoint_path),
        "source": source,
        "num_images": len(ranked),
        "k": k,
        "suggest": dict(settings.__dict__),
        "top": [item.id for item in ranked[:k]],
    }
    atomic_write_json(output_dir / "suggest.json", summary)
    log.info("top %d of %d: %s -> %s", k, len(ranked), ", ".join(summary["top"][:5]), output_dir / SUGGESTIONS_CSV)
    return summary


_task_started = False


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="suggest")
def main(cfg: DictConfig) -> None:
    global _task_started
    _task_started = True
    suggest(cfg)


def cli() -> None:
    run_hydra_app(main, lambda: _task_started)


if __name__ == "__main__":
    cli()
