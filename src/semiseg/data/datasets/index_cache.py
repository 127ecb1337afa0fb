"""A cached index of mask facts, so that start-up never decodes a large dataset twice.

Some datasets only reveal an image's defect classes (the stratum of the split) inside its mask: NEU-Seg
(several classes per image), KolektorSDD2 (most images are defect-free), a user's ``folder``. The first
time such a dataset is built, :class:`MaskIndex` reads every *mask* once — checking its values and
comparing its size with the image's header (images are not decoded) — and writes what it found to
``<cache_dir>/index/<dataset>-<key>.json``. Later runs read that file and only re-scan masks whose size
or modification time changed. Image contents are still checked lazily, when a sample is loaded.

The key hashes the dataset root and the settings that change how a mask is read (class list, value
mapping, threshold), so editing those settings never reuses a stale index.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from PIL import Image

from semiseg.data.datasets.base import DefectDataset, Sample
from semiseg.errors import DataError

log = logging.getLogger(__name__)

INDEX_VERSION = 1


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` through a temporary file and a rename (no torch import, unlike ``semiseg.io``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(descriptor, "w") as handle:
            json.dump(data, handle)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def image_size(path: Path) -> tuple[int, int]:
    """``(width, height)`` of an image file from its header (no decoding)."""
    try:
        with Image.open(path) as handle:
            return handle.size
    except (OSError, ValueError) as error:
        raise DataError(f"{path}: cannot read this image file ({error})") from None


def scan_mask(dataset: DefectDataset, sample: Sample) -> frozenset[int]:
    """Load ``sample``'s mask, check it against the image header, return its defect classes."""
    mask = dataset.load_mask(sample)
    width, height = image_size(Path(sample.image))
    if mask.shape != (height, width):
        raise DataError(
            f"{sample.mask}: mask is {mask.shape[1]}x{mask.shape[0]} but its image {sample.image} is "
            f"{width}x{height}; masks must have their image's size"
        )
    dataset.check_mask_values(mask, sample)
    present = {int(v) for v in set(mask.ravel().tolist())}
    return frozenset(present - {0, dataset.ignore_index})


class MaskIndex:
    """Per-mask defect classes, computed once and cached on disk.

    Args:
        cache_dir: folder of the cache (``paths.cache_dir``); ``None`` scans every time, caching nothing.
        name: dataset name (part of the file name).
        settings: everything that changes how masks are read (root, classes, mappings); part of the key.
    """

    def __init__(self, cache_dir: str | Path | None, name: str, settings: dict[str, Any]) -> None:
        key = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]
        self.path = Path(cache_dir) / "index" / f"{name}-{key}.json" if cache_dir else None
        self._cached: dict[str, list] | None = None  # the file's entries, read on first use
        self._entries: dict[str, list] = {}  # entries of the masks seen by this index (what gets written)

    def _read(self) -> dict[str, list]:
        if self.path is None or not self.path.is_file():
            return {}
        try:
            data = json.loads(self.path.read_text())
        except (OSError, json.JSONDecodeError):
            log.warning("%s: unreadable index cache, rebuilding it", self.path)
            return {}
        if data.get("version") != INDEX_VERSION:
            return {}
        return data.get("masks", {})

    def with_classes(self, samples: Sequence[Sample], scan: Callable[[Sample], Iterable[int]]) -> list[Sample]:
        """``samples`` with ``classes`` filled from the cache, scanning (and caching) masks not in it.

        Samples without a mask file (``mask`` is ``None`` or an in-memory index) are returned as they are.
        Successive calls (one per pool) accumulate: the file holds every mask seen by this index.
        """
        if self._cached is None:
            self._cached = self._read()
        cached, entries = self._cached, self._entries
        out: list[Sample] = []
        scanned = 0
        for sample in samples:
            if not isinstance(sample.mask, Path):
                out.append(sample)
                continue
            key = str(sample.mask.resolve())
            stat = os.stat(sample.mask)
            entry = cached.get(key)
            if entry is None or entry[0] != stat.st_size or entry[1] != stat.st_mtime_ns:
                if scanned == 0:
                    log.info(
                        "indexing masks (first use or changed files)%s", f"; cache {self.path}" if self.path else ""
                    )
                entry = [stat.st_size, stat.st_mtime_ns, sorted(int(c) for c in scan(sample))]
                scanned += 1
            entries[key] = entry
            out.append(replace(sample, classes=frozenset(entry[2])))
        if self.path is not None and (scanned or not set(entries) <= set(cached)):
            try:
                write_json(self.path, {"version": INDEX_VERSION, "masks": entries})
            except OSError as error:  # a cache is a convenience: the run goes on without it
                log.warning("mask index not cached: %s", error)
        if scanned:
            log.info("indexed %d masks", scanned)
        return out
