"""Look at a dataset before training: ``python -m semiseg.data.inspect dataset=NAME``.

Prints, and writes as ``summary.json`` into the run directory:

- images per pool (train, official val / test where the dataset has them, extra unlabeled) and how many
  hold a defect;
- per class: the number of images holding it and its share of all labeled pixels;
- image sizes (read from file headers) and the per-channel mean / std of the pixels (values in [0, 1],
  what ``dataset.mean`` / ``dataset.std`` expect);

and draws ``examples-<dataset>.png``: a grid of training images with their masks overlaid in one colour
per class. Pixel statistics decode at most ``inspect.max_images`` images (all by default).
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import hydra
import numpy as np
from hydra.utils import instantiate
from omegaconf import DictConfig

from semiseg.config import CONFIG_DIR
from semiseg.data.datasets.base import DefectDataset, Sample
from semiseg.data.datasets.index_cache import image_size
from semiseg.errors import ConfigError, exit_on_user_error

log = logging.getLogger("semiseg.inspect")

SUMMARY_FILE = "summary.json"


def pools_of(dataset: DefectDataset) -> dict[str, list[Sample]]:
    """The dataset's pools by name (only those it has)."""
    pools = {"train": dataset.train_samples}
    if dataset.val_samples is not None:
        pools["val"] = dataset.val_samples
    if dataset.test_samples is not None:
        pools["test"] = dataset.test_samples
    if dataset.extra_unlabeled_samples:
        pools["unlabeled"] = dataset.extra_unlabeled_samples
    return pools


def spread(samples: Sequence[Sample], limit: int | None) -> list[Sample]:
    """At most ``limit`` samples, evenly spaced over ``samples`` (all when ``limit`` is ``None``)."""
    if limit is None or len(samples) <= limit:
        return list(samples)
    positions = np.linspace(0, len(samples) - 1, limit).round().astype(int)
    return [samples[i] for i in positions]


def stored_size(dataset: DefectDataset, sample: Sample) -> tuple[int, int]:
    """``(width, height)`` of a sample as stored: read from the file header, the size a generated dataset draws
    at (``generated_size``), or else the loaded image's."""
    if isinstance(sample.image, (str, Path)):
        return image_size(Path(sample.image))
    generated = getattr(dataset, "generated_size", None)
    if generated is not None:
        return tuple(generated)
    height, width = dataset.load(sample)[0].shape[:2]
    return width, height


def summarize(dataset: DefectDataset, max_images: int | None = None) -> dict[str, Any]:
    """Counts, class statistics, sizes and channel statistics of ``dataset`` (see the module docstring)."""
    pools = pools_of(dataset)
    labeled = [s for name, pool in pools.items() if name != "unlabeled" for s in pool]
    examined = spread(labeled, max_images)
    pixels = np.zeros(dataset.num_classes, dtype=np.int64)
    images_with = np.zeros(dataset.num_classes, dtype=np.int64)
    channel_sum = np.zeros(dataset.in_channels)
    channel_sq = np.zeros(dataset.in_channels)
    channel_count = 0
    for sample in examined:
        image, mask = dataset.load(sample)
        values = image.reshape(-1, image.shape[2]).astype(np.float64) / 255.0
        channel_sum += values.sum(0)
        channel_sq += (values**2).sum(0)
        channel_count += len(values)
        counts = np.bincount(mask[mask != dataset.ignore_index].ravel(), minlength=dataset.num_classes)
        pixels += counts[: dataset.num_classes]
        images_with += counts[: dataset.num_classes] > 0
    sizes = Counter(stored_size(dataset, s) for pool in pools.values() for s in pool)
    mean = channel_sum / max(channel_count, 1)
    std = np.sqrt(np.maximum(channel_sq / max(channel_count, 1) - mean**2, 0.0))
    total_pixels = max(int(pixels.sum()), 1)
    return {
        "dataset": dataset.name,
        "pools": {
            name: {"images": len(pool), "with_defect": sum(bool(s.classes) for s in pool if s.classes is not None)}
            for name, pool in pools.items()
        },
        "classes": {
            name: {"images": int(images_with[i]), "pixel_share": float(pixels[i] / total_pixels)}
            for i, name in enumerate(dataset.class_names)
        },
        "images_examined": len(examined),
        "images_labeled": len(labeled),
        "image_sizes": {
            "distinct": len(sizes),
            "most_common": [{"width": w, "height": h, "images": n} for (w, h), n in sizes.most_common(5)],
            "width": [min((w for w, _ in sizes), default=0), max((w for w, _ in sizes), default=0)],
            "height": [min((h for _, h in sizes), default=0), max((h for _, h in sizes), default=0)],
        },
        "channel_mean": [round(float(v), 4) for v in mean],
        "channel_std": [round(float(v), 4) for v in std],
    }


def format_summary(summary: dict[str, Any]) -> str:
    """The summary as a few lines of text."""
    lines = [f"dataset {summary['dataset']}"]
    for name, pool in summary["pools"].items():
        defect = "" if name == "unlabeled" else f", {pool['with_defect']} with a defect"
        lines.append(f"  {name:<10} {pool['images']:>6} images{defect}")
    lines.append(f"  classes (from {summary['images_examined']} of {summary['images_labeled']} labeled images):")
    for name, stats in summary["classes"].items():
        lines.append(f"    {name:<16} {stats['images']:>6} images  {100 * stats['pixel_share']:8.3f}% of pixels")
    sizes = summary["image_sizes"]
    common = ", ".join(f"{s['width']}x{s['height']} ({s['images']})" for s in sizes["most_common"])
    lines.append(
        f"  image sizes: {sizes['distinct']} distinct, width {sizes['width'][0]}-{sizes['width'][1]}, "
        f"height {sizes['height'][0]}-{sizes['height'][1]}; most common {common}"
    )
    lines.append(f"  channel mean {summary['channel_mean']}  std {summary['channel_std']}")
    return "\n".join(lines)


def pick_examples(dataset: DefectDataset, count: int, seed: int) -> list[Sample]:
    """Training images for the grid: each defect class in turn, then one defect-free image if any."""
    rng = np.random.default_rng(seed)
    pool = sorted(dataset.train_samples, key=lambda s: s.id)
    order = [pool[i] for i in rng.permutation(len(pool))]
    by_class: dict[int, list[Sample]] = {
        c: [s for s in order if s.classes and c in s.classes] for c in range(1, dataset.num_classes)
    }
    defect_free = [s for s in order if s.classes is not None and not s.classes]
    picked: list[Sample] = []
    budget = count - (1 if defect_free else 0)
    while len(picked) < budget and any(by_class.values()):
        for candidates in by_class.values():
            while candidates and candidates[0] in picked:
                candidates.pop(0)
            if candidates and len(picked) < budget:
                picked.append(candidates.pop(0))
    if defect_free:
        picked.append(defect_free[0])
    for sample in order:  # datasets whose classes are unknown, or too few defects
        if len(picked) >= count:
            break
        if sample not in picked:
            picked.append(sample)
    return picked[:count]


def class_colours(num_classes: int) -> np.ndarray:
    """``(num_classes, 3)`` RGB colours in [0, 1]; background is unused."""
    import matplotlib

    palette = matplotlib.colormaps["tab10"].colors
    return np.array([(0.0, 0.0, 0.0), *[palette[i % len(palette)] for i in range(num_classes - 1)]])


def overlay(image: np.ndarray, mask: np.ndarray, colours: np.ndarray, alpha: float, ignore_index: int) -> np.ndarray:
    """``image (H, W, C)`` uint8 with ``mask (H, W)`` classes blended in: ``(H, W, 3)`` float in [0, 1]."""
    rgb = image.astype(np.float64) / 255.0
    if rgb.shape[2] == 1:
        rgb = np.repeat(rgb, 3, axis=2)
    labeled = (mask > 0) & (mask != ignore_index)
    safe = np.where(labeled, mask, 0)
    rgb[labeled] = (1 - alpha) * rgb[labeled] + alpha * colours[safe[labeled]]
    return rgb


def render_grid(
    dataset: DefectDataset, samples: Sequence[Sample], path: Path, columns: int = 4, alpha: float = 0.45
) -> Path:
    """Draw ``samples`` with their masks overlaid into the PNG ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    colours = class_colours(dataset.num_classes)
    rows = max(1, math.ceil(len(samples) / columns))
    figure, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 3.4 * rows + 0.6), squeeze=False)
    for axis in axes.ravel():
        axis.axis("off")
    for axis, sample in zip(axes.ravel(), samples):
        image, mask = dataset.load(sample)
        if mask is None:
            mask = np.zeros(image.shape[:2], dtype=np.int64)
        axis.imshow(overlay(image, mask, colours, alpha, dataset.ignore_index))
        classes = sorted(set(np.unique(mask).tolist()) - {0, dataset.ignore_index})
        for class_index in classes:  # an opaque outline keeps tiny defects visible
            axis.contour(mask == class_index, levels=[0.5], colors=[colours[class_index]], linewidths=0.8)
        present = [dataset.class_names[c] for c in classes]
        axis.set_title(f"{sample.id}\n{', '.join(present) or 'no defect'}", fontsize=8)
    handles = [Patch(color=colours[i], label=name) for i, name in enumerate(dataset.class_names) if i > 0]
    figure.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), fontsize=9, frameon=False)
    figure.suptitle(f"{dataset.name}: {len(samples)} training images, masks overlaid", fontsize=11)
    figure.tight_layout(rect=(0, 0.05, 1, 0.97))
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


@exit_on_user_error
def inspect(cfg: DictConfig) -> dict[str, Any]:
    """Build the dataset of ``cfg``, print and save its summary, draw the example grid."""
    options = cfg.inspect
    for key in ("num_examples", "columns"):
        if not isinstance(options[key], int) or options[key] < 1:
            raise ConfigError(f"inspect.{key}={options[key]!r} must be a positive integer")
    if options.max_images is not None and (not isinstance(options.max_images, int) or options.max_images < 1):
        raise ConfigError(f"inspect.max_images={options.max_images!r} must be a positive integer or null")
    dataset: DefectDataset = instantiate(cfg.dataset.source, _convert_="all")
    output_dir = Path(options.output_dir)
    summary = summarize(dataset, options.max_images)
    grid = render_grid(
        dataset,
        pick_examples(dataset, options.num_examples, options.seed),
        output_dir / f"examples-{dataset.name}.png",
        columns=options.columns,
        alpha=options.overlay_alpha,
    )
    summary["grid"] = grid.name
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    print(format_summary(summary))
    print(f"summary: {output_dir / SUMMARY_FILE}\ngrid:    {grid}")
    return summary


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="inspect")
def main(cfg: DictConfig) -> None:
    inspect(cfg)


if __name__ == "__main__":
    main()
