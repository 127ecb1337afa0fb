"""Apply a trained model to a folder of images: from a checkpoint or from an exported model (``semiseg.export``).

Both paths share one description of the model, the *model card* (what ``model.json`` holds beside an export):
class names, input channels, normalisation, how images enter the network (``resize`` to the training
``image_size``, or ``sliding_window`` over the whole image at ``scale`` times its resolution when the model was
trained on ``data.crop_size`` patches), and the training run's identity. :class:`Predictor` turns an image file
into per-class probabilities at the image's own size, whichever network computes the logits.

:func:`predict_folder` writes, per image: ``masks/<stem>.png`` (class indices at the image's size),
``overlays/<stem>.png`` (with ``overlay=true``) and one row of ``predictions.csv``: ``image``,
``defect_pixels`` (pixels predicted as any defect class), ``defect_share`` (their share of the image),
``max_probability`` (the highest defect-class probability at any pixel: sort by it to see the most suspicious
images first) and ``area_<class>`` (pixels predicted as each defect class).
"""

from __future__ import annotations

import csv
import io
import json
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from omegaconf import DictConfig

from semiseg.callbacks import overlay, with_legend
from semiseg.data.datasets.base import read_image
from semiseg.errors import ConfigError
from semiseg.inference import SlidingWindow
from semiseg.io import atomic_write_bytes, atomic_write_text
from semiseg.results import run_identity

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
CARD_FILE = "model.json"
PREDICTIONS_FILE = "predictions.csv"
EXPORT_SUFFIXES = {".onnx": "onnx", ".pt": "torchscript"}
CARD_VERSION = 1

LogitsFunction = Callable[[torch.Tensor], torch.Tensor]


# ---- the model card --------------------------------------------------------------------------------------
def model_card(
    module: Any, dataset_cfg: Mapping[str, Any], run_cfg: DictConfig | None, checkpoint_path: Path | None
) -> dict[str, Any]:
    """Everything needed to apply ``module``'s inference network outside the suite, as plain data.

    ``dataset_cfg`` gives the normalisation and the training ``image_size``; ``run_cfg`` (the run's
    ``config.yaml``, if found) the ``data.scale`` and the run's identity.
    """
    window: SlidingWindow | None = getattr(module, "sliding_window", None)
    if window is not None:
        scale = float((run_cfg.data.get("scale") if run_cfg is not None else None) or 1.0)
        preprocessing: dict[str, Any] = {"mode": "sliding_window", "scale": scale, **window.settings()}
        input_size = list(window.window_size)
    else:
        input_size = [int(side) for side in dataset_cfg["image_size"]]
        preprocessing = {"mode": "resize", "image_size": input_size}
    return {
        "version": CARD_VERSION,
        "class_names": list(module.class_names),
        "background_index": int(module.val_metrics.background_index),
        "in_channels": int(module.in_channels),
        "mean": [float(v) for v in dataset_cfg["mean"]],
        "std": [float(v) for v in dataset_cfg["std"]],
        "input": {
            "name": "image",
            "layout": "NCHW float32, (pixel / 255 - mean) / std",
            "size": input_size,
            "size_divisor": int(getattr(module.inference_network, "size_divisor", 1)),
        },
        "output": {"name": "logits", "layout": "NCHW float32, one channel per class"},
        "preprocessing": preprocessing,
        "run": {
            **(run_identity(run_cfg) if run_cfg is not None else {"method": module.method_name}),
            "checkpoint": str(checkpoint_path) if checkpoint_path is not None else None,
        },
    }


def read_card(path: Path) -> dict[str, Any]:
    """``model.json`` at ``path``; one line naming the file when it is missing or not a card."""
    if not path.is_file():
        raise ConfigError(f"{path}: no model.json beside the exported model; export it with python -m semiseg.export")
    try:
        card = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ConfigError(f"{path}: not valid JSON ({error}); export the model again") from error
    missing = [key for key in ("class_names", "mean", "std", "in_channels", "preprocessing") if key not in card]
    if missing:
        raise ConfigError(f"{path}: model.json lacks {missing}; export the model again with python -m semiseg.export")
    return card


# ---- predictors ------------------------------------------------------------------------------------------
class Predictor:
    """Per-class probabilities of whole images from a network's logits and a model card.

    Args:
        logits: maps normalised images ``(B, C, h, w)`` at the card's input size to logits ``(B, K, h, w)``.
        card: the model card (:func:`model_card` / ``model.json``).
    """

    def __init__(self, logits: LogitsFunction, card: Mapping[str, Any]) -> None:
        self.logits = logits
        self.card = dict(card)
        self.class_names = list(card["class_names"])
        self.in_channels = int(card["in_channels"])
        self.background_index = int(card.get("background_index", 0))
        self.mean = torch.tensor(card["mean"], dtype=torch.float32).view(-1, 1, 1) * 255.0
        self.std = torch.tensor(card["std"], dtype=torch.float32).view(-1, 1, 1) * 255.0
        preprocessing = dict(card["preprocessing"])
        self.mode = preprocessing["mode"]
        self.window = (
            SlidingWindow.from_config({"sliding_window": True, **preprocessing})
            if self.mode == "sliding_window"
            else None
        )
        self.scale = float(preprocessing.get("scale", 1.0))
        self.image_size = preprocessing.get("image_size")

    def network_input(self, image: np.ndarray) -> torch.Tensor:
        """``image (H, W, C)`` uint8 -> normalised ``(1, C, h, w)`` at the size the network works on."""
        height, width = image.shape[:2]
        if self.mode == "resize":  # as the evaluation views: albumentations' Resize (bilinear)
            size, interpolation = (int(self.image_size[1]), int(self.image_size[0])), cv2.INTER_LINEAR
        else:  # as transforms.scale_transforms
            size = (max(1, round(width * self.scale)), max(1, round(height * self.scale)))
            interpolation = cv2.INTER_AREA
        if size != (width, height):
            image = cv2.resize(image, size, interpolation=interpolation).reshape(size[1], size[0], -1)
        tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float()
        return ((tensor - self.mean) / self.std)[None]

    @torch.no_grad()
    def probabilities(self, image: np.ndarray) -> np.ndarray:
        """``image (H, W, C)`` uint8 -> softmax ``(K, H, W)`` float32 at the image's own size."""
        tensor = self.network_input(image)
        logits = self.window(self.logits, tensor) if self.window is not None else self.logits(tensor)
        probabilities = logits.float().softmax(dim=1)[0]
        height, width = image.shape[:2]
        if probabilities.shape[-2:] != (height, width):
            probabilities = torch.nn.functional.interpolate(
                probabilities[None], size=(height, width), mode="bilinear", align_corners=False
            )[0]
        return probabilities.cpu().numpy()


def checkpoint_predictor(module: Any, card: Mapping[str, Any]) -> Predictor:
    """A :class:`Predictor` running ``module``'s inference network (eval mode, CPU or its device)."""
    module.eval()
    device = next(module.parameters()).device

    def logits(tensor: torch.Tensor) -> torch.Tensor:
        return module.predict_logits(tensor.to(device)).cpu()

    return Predictor(logits, card)


def exported_model_path(path: str | Path | None) -> Path | None:
    """The exported model file ``path`` names (a ``model.onnx`` / ``model.pt``, or a folder holding one),
    or ``None`` when ``path`` is something else (e.g. a ``.ckpt``)."""
    if path in (None, "", "???"):
        return None
    path = Path(str(path))
    if path.is_dir():
        found = [path / f"model{suffix}" for suffix in EXPORT_SUFFIXES if (path / f"model{suffix}").is_file()]
        if not found:
            raise ConfigError(
                f"{path}: no model.onnx or model.pt in this folder; export one with python -m semiseg.export"
            )
        return found[0]
    return path if path.suffix in EXPORT_SUFFIXES else None


def exported_predictor(path: Path) -> Predictor:
    """A :class:`Predictor` over an exported ``model.onnx`` (ONNX Runtime) or ``model.pt`` (TorchScript)."""
    if not path.is_file():
        raise ConfigError(f"ckpt={path}: no such exported model; give model.onnx / model.pt from semiseg.export")
    card = read_card(path.parent / CARD_FILE)
    if EXPORT_SUFFIXES[path.suffix] == "onnx":
        session = onnx_session(path)
        input_name = session.get_inputs()[0].name

        def logits(tensor: torch.Tensor) -> torch.Tensor:
            return torch.from_numpy(session.run(None, {input_name: tensor.numpy().astype(np.float32)})[0])

    else:
        scripted = load_torchscript(path)

        def logits(tensor: torch.Tensor) -> torch.Tensor:
            return scripted(tensor)

    return Predictor(logits, card)


def load_torchscript(path: Path) -> torch.jit.ScriptModule:
    """A TorchScript model in eval mode on the CPU (torch's deprecation notice of TorchScript silenced)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.load(str(path), map_location="cpu").eval()


def onnx_session(path: Path) -> Any:
    """An ONNX Runtime CPU session of ``path``; one line saying how to install it when it is missing."""
    try:
        import onnxruntime
    except ImportError as error:
        raise ConfigError(
            "ONNX models need onnxruntime: pip install -e '.[deploy]' (or use format=torchscript)"
        ) from error
    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])


# ---- a folder ----------------------------------------------------------------------------------------------
def list_images(folder: Path) -> list[Path]:
    """The image files of ``folder`` (sorted); one line when there is none or the folder is missing."""
    if not folder.is_dir():
        raise ConfigError(f"input_dir={folder}: {'not a folder' if folder.exists() else 'no such folder'}")
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []
    if not images:
        raise ConfigError(f"input_dir={folder}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder")
    return images


def prediction_row(name: str, probabilities: np.ndarray, prediction: np.ndarray, predictor: Predictor) -> dict:
    """One row of ``predictions.csv`` from ``probabilities (K, H, W)`` and ``prediction (H, W)``."""
    defect = [index for index in range(len(predictor.class_names)) if index != predictor.background_index]
    counts = np.bincount(prediction.ravel(), minlength=len(predictor.class_names))
    defect_pixels = int(counts[defect].sum())
    row: dict[str, Any] = {
        "image": name,
        "defect_pixels": defect_pixels,
        "defect_share": round(defect_pixels / prediction.size, 8),
        "max_probability": round(float(probabilities[defect].max()), 6) if defect else 0.0,
    }
    for index in defect:
        row[f"area_{predictor.class_names[index]}"] = int(counts[index])
    return row


def write_csv(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    """``rows`` as a CSV file (header from the first row), written atomically."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue())


def write_png(path: Path, picture: np.ndarray) -> None:
    """A ``(H, W)`` or RGB ``(H, W, 3)`` uint8 picture as PNG, atomically."""
    if picture.ndim == 3:
        picture = cv2.cvtColor(picture, cv2.COLOR_RGB2BGR)
    atomic_write_bytes(path, cv2.imencode(".png", picture)[1].tobytes())


def predict_folder(predictor: Predictor, input_dir: str | Path, output_dir: Path, with_overlay: bool) -> dict:
    """Predict every image of ``input_dir``: masks, optional overlays and ``predictions.csv`` under ``output_dir``.
    Returns the summary that ``evaluation.json`` holds."""
    folder = Path(input_dir)
    images = list_images(folder)
    rows = []
    counts = np.zeros(len(predictor.class_names), dtype=np.int64)
    for path in images:
        image = read_image(path, predictor.in_channels)
        probabilities = predictor.probabilities(image)
        prediction = probabilities.argmax(axis=0).astype(np.uint8)
        counts += np.bincount(prediction.ravel(), minlength=len(counts))
        write_png(output_dir / "masks" / f"{path.stem}.png", prediction)
        if with_overlay:
            write_png(
                output_dir / "overlays" / f"{path.stem}.png",
                with_legend(overlay(image, prediction), predictor.class_names),
            )
        rows.append(prediction_row(path.name, probabilities, prediction, predictor))
    write_csv(output_dir / PREDICTIONS_FILE, rows)
    share = counts / max(1, counts.sum())
    return {
        "input_dir": str(folder),
        "num_images": len(images),
        "masks": str(output_dir / "masks"),
        "predictions": str(output_dir / PREDICTIONS_FILE),
        "preprocessing": predictor.mode,
        "predicted_pixel_share": {name: float(s) for name, s in zip(predictor.class_names, share, strict=True)},
    }
