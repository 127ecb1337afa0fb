"""Reading a checkpoint file a user names (``ckpt_path=`` of train, ``ckpt=`` of evaluate), with one-line errors.

A Lightning checkpoint is a zip archive written by ``torch.save`` holding ``<name>/data.pkl``. A file that is
not such an archive (text, an empty or truncated file) is told apart from a complete archive whose pickle needs
more than ``weights_only=True`` allows: only the latter gets the advice to add ``trust_checkpoint=true``.
"""

from __future__ import annotations

import pickle
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from semiseg.errors import ConfigError

UNTRUSTED_MARKERS = ("Unsupported global", "Weights only load failed", "weights_only")


def checkpoint_problem(path: Path) -> str | None:
    """Why ``path`` is not a complete ``torch.save`` archive (``None`` when it is one)."""
    if not path.is_file():
        return "no such checkpoint file"
    if path.stat().st_size == 0:
        return "the file is empty"
    if not zipfile.is_zipfile(path):
        return "not a PyTorch checkpoint (not a torch.save archive: a text, damaged or truncated file)"
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            damaged = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as error:
        return f"a damaged checkpoint archive ({error})"
    if damaged is not None:
        return f"a damaged checkpoint archive ({damaged} is corrupt): is the file complete?"
    if not any(name.endswith("data.pkl") for name in names):
        return "a zip archive, but not a PyTorch checkpoint (no data.pkl)"
    return None


def read_checkpoint(path: Path, key: str, trust: bool = False) -> dict[str, Any]:
    """The content of the checkpoint ``key=path``, read with ``weights_only=not trust``.

    Raises:
        ConfigError: one line: the file is missing or not a checkpoint; or it is a complete checkpoint whose
            pickle holds more than tensors and plain data (then ``trust_checkpoint=true`` is suggested).
    """
    path = Path(path)
    problem = checkpoint_problem(path)
    if problem is not None:
        raise ConfigError(f"{key}={path}: {problem}; give the .ckpt of a run (its checkpoints/ folder)")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=not trust)
    except pickle.UnpicklingError as error:
        detail = str(error).strip().splitlines()[-1][:160] if str(error).strip() else type(error).__name__
        if not trust and any(marker in str(error) for marker in UNTRUSTED_MARKERS):
            raise ConfigError(
                f"{key}={path} holds pickled objects beyond weights and plain data ({detail}); "
                "if you trust the file, add trust_checkpoint=true"
            ) from error
        raise ConfigError(f"{key}={path}: not a readable checkpoint ({detail}); is the file complete?") from error
    except (RuntimeError, EOFError, ValueError, AttributeError, ModuleNotFoundError) as error:
        detail = (str(error).strip().splitlines() or [type(error).__name__])[0][:160]
        raise ConfigError(f"{key}={path}: not a readable checkpoint ({detail}); is the file complete?") from error
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ConfigError(f"{key}={path}: a torch file, but not a Lightning checkpoint (no state_dict)")
    return checkpoint


def check_training_checkpoint(path: Path, class_names: Sequence[str], in_channels: int) -> None:
    """``ckpt_path=path`` must be a readable checkpoint of a network with these classes and input channels.

    Read with the full unpickler, as Lightning does when it continues from the file (the user named it)."""
    checkpoint = read_checkpoint(path, "ckpt_path", trust=True)
    hyper = checkpoint.get("hyper_parameters") or {}
    saved_classes = hyper.get("class_names")
    if saved_classes is not None and list(saved_classes) != list(class_names):
        raise ConfigError(
            f"ckpt_path={path} was trained on {len(saved_classes)} classes {list(saved_classes)} but this run's "
            f"dataset has {len(class_names)}: {list(class_names)}; continue only from a checkpoint of the same "
            "classes (or start without ckpt_path)"
        )
    saved_channels = hyper.get("in_channels")
    if saved_channels is not None and int(saved_channels) != int(in_channels):
        raise ConfigError(
            f"ckpt_path={path} takes {saved_channels}-channel images but dataset.in_channels={in_channels}"
        )
