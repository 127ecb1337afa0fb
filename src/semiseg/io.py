"""Atomic writes: a file is either its old version or its complete new one, never half written."""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from semiseg.errors import SemiSegError


class WriteError(SemiSegError, OSError):
    """Saving failed (full disk, no permission); the previous version of the file is intact."""


# below this many free bytes on the target's file system a failed write is reported as a full disk
NEARLY_FULL_BYTES = 64 * 2**20


def _disk_is_full(path: Path, error: BaseException) -> bool:
    """Whether ``error`` (raised while writing ``path``) comes from a full disk: ``ENOSPC``, or any error
    (``torch.save`` raises a ``RuntimeError`` "file write failed") while the file system is nearly full."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    try:
        return shutil.disk_usage(path.parent).free < NEARLY_FULL_BYTES
    except OSError:
        return False


def write_error(path: Path, error: BaseException, what: str = "file") -> WriteError:
    """The one-line :class:`WriteError` for a failed write of ``path`` (the previous ``what`` is intact)."""
    if _disk_is_full(path, error):
        return WriteError(f"no space left writing {path}; free disk space and rerun (the previous {what} is unchanged)")
    detail = error.strerror if isinstance(error, OSError) and error.strerror else str(error).splitlines()[0]
    return WriteError(
        f"cannot write {path}: {detail}; free disk space or fix the folder's permissions "
        f"(the previous {what} is unchanged)"
    )


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(descriptor, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
    except OSError as error:
        raise write_error(path, error, "version of the file") from error


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save(obj)`` to ``path`` through a temporary file and a rename (small objects: held in memory)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint IO that saves through a temporary file and a rename.

    Any failure while writing (``torch.save`` raises ``RuntimeError`` on a full disk, ``os.replace`` an
    ``OSError``) removes the temporary file and becomes one :class:`WriteError` line; the previous
    checkpoint of that name is untouched. An interrupt (``KeyboardInterrupt``) also removes it, then goes on.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        path = Path(path)
        temporary = path.with_name(f".{path.name}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(checkpoint, temporary)
            os.replace(temporary, path)
        except Exception as error:
            temporary.unlink(missing_ok=True)
            raise write_error(path, error, "checkpoint") from error
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
