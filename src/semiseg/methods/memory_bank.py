"""Per-class FIFO queues of feature vectors (U2PL's memory bank of negative samples).

:class:`ClassQueues` keeps, for every class ``c``, the most recent ``capacity[c]`` feature vectors pushed
for it. The queues are module buffers, so they move with the module (``.to(device)``), are saved in
Lightning checkpoints and restored from them.

Checkpoint size. Full queues of U2PL's paper size (30k entries per class, 50k for background) of 256-d
float32 vectors take ``(50k + 30k (C - 1)) * 256 * 4`` bytes — 205 MB for 6 classes, in every checkpoint
file. Three choices keep that sane:

* each queue buffer *grows* as entries arrive (shape ``(filled, dim)``), so a checkpoint holds only what was
  pushed, never empty slots;
* entries are stored L2-normalised in ``float16`` by default (``dtype``). U2PL uses queue entries only
  through cosine similarities, which do not depend on the norm, so normalising loses nothing and half
  precision halves the size (about 1e-3 relative error on a similarity): 102 MB for 6 full paper-size queues;
* capacities are configuration (``method.queue_size``, ``method.background_queue_size``); the CPU
  experiment uses a tenth of the paper's.

Under DDP every push is first all-gathered across processes, so every rank enqueues every rank's samples
and the queues stay identical on all ranks (as in the official code, which gathers before enqueueing).
Every rank must therefore call :meth:`push` for the same classes in the same order, also with no keys.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from semiseg.errors import ConfigError, check_choice

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def distributed_world_size() -> int:
    """Number of processes of the default process group (1 without one)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


@torch.no_grad()
def all_gather_rows(rows: torch.Tensor) -> torch.Tensor:
    """Concatenate ``rows (n_r, D)`` of every process in rank order; ``n_r`` may differ between ranks.

    Without a process group (or with one process) returns ``rows`` unchanged.
    """
    world_size = distributed_world_size()
    if world_size == 1:
        return rows
    count = torch.tensor([rows.shape[0]], device=rows.device, dtype=torch.long)
    counts = [torch.zeros_like(count) for _ in range(world_size)]
    dist.all_gather(counts, count)
    sizes = [int(c.item()) for c in counts]
    largest = max(sizes)
    padded = rows.new_zeros((largest, *rows.shape[1:]))
    padded[: rows.shape[0]] = rows
    gathered = [torch.empty_like(padded) for _ in range(world_size)]
    dist.all_gather(gathered, padded.contiguous())
    return torch.cat([part[:size] for part, size in zip(gathered, sizes, strict=True)], dim=0)


class ClassQueues(nn.Module):
    """One FIFO queue of ``dim``-d vectors per class, stored as growing buffers ``queue_<c>``.

    Args:
        capacities: maximum number of entries of each class's queue (one per class).
        dim: vector size.
        dtype: storage precision, ``float16`` (default), ``bfloat16`` or ``float32``.
        normalize: store vectors L2-normalised (cosine-similarity users lose nothing).

    Buffers: ``queue_<c>`` ``(n_c, dim)`` with ``n_c <= capacities[c]``; ``pointers`` ``(C,)`` int64 — the
    slot written next, which is the oldest entry once a queue is full.
    """

    def __init__(self, capacities: Sequence[int], dim: int, dtype: str = "float16", normalize: bool = True) -> None:
        super().__init__()
        if not capacities or any(int(c) < 1 for c in capacities):
            raise ConfigError(f"memory queue capacities {list(capacities)} must be positive integers")
        check_choice("method.queue_dtype", dtype, sorted(DTYPES))
        self.capacities = [int(c) for c in capacities]
        self.dim = int(dim)
        self.dtype = DTYPES[dtype]
        self.normalize = normalize
        for index in range(self.num_classes):
            self.register_buffer(f"queue_{index}", torch.zeros(0, self.dim, dtype=self.dtype))
        self.register_buffer("pointers", torch.zeros(self.num_classes, dtype=torch.long))

    @property
    def num_classes(self) -> int:
        return len(self.capacities)

    def queue(self, class_index: int) -> torch.Tensor:
        """The raw storage of one class ``(n_c, dim)`` (ring order once full)."""
        return getattr(self, f"queue_{class_index}")

    def __len__(self) -> int:
        return sum(self.queue(c).shape[0] for c in range(self.num_classes))

    def size(self, class_index: int) -> int:
        """Number of entries held for ``class_index``."""
        return self.queue(class_index).shape[0]

    def items(self, class_index: int) -> torch.Tensor:
        """The entries of one class, oldest first ``(n_c, dim)``."""
        queue = self.queue(class_index)
        if queue.shape[0] < self.capacities[class_index]:
            return queue
        return torch.roll(queue, -int(self.pointers[class_index]), dims=0)

    @torch.no_grad()
    def push(self, class_index: int, keys: torch.Tensor, gather: bool = True) -> int:
        """Append ``keys (n, dim)`` to the queue of ``class_index``, dropping the oldest beyond capacity.

        Under DDP (``gather=True``) the keys of every rank are appended, in rank order.
        Returns the number of entries appended (after gathering).
        """
        if keys.ndim != 2 or keys.shape[1] != self.dim:
            raise ValueError(f"keys must have shape (n, {self.dim}), got {tuple(keys.shape)}")
        with torch.autocast(device_type=keys.device.type, enabled=False):  # CPU autocast rejects float16 cat
            return self._push(class_index, keys, gather)

    def _push(self, class_index: int, keys: torch.Tensor, gather: bool) -> int:
        keys = keys.detach()
        if gather:
            keys = all_gather_rows(keys)
        count = keys.shape[0]
        if count == 0:
            return 0
        if self.normalize:
            keys = F.normalize(keys.float(), dim=1)
        keys = keys.to(self.dtype)
        capacity = self.capacities[class_index]
        name = f"queue_{class_index}"
        queue = self.queue(class_index).to(keys.device)
        if count >= capacity:  # only the newest `capacity` keys survive
            setattr(self, name, keys[-capacity:].clone())
            self.pointers[class_index] = 0
            return count
        room = capacity - queue.shape[0]
        if room > 0:  # still growing: append what fits
            queue = torch.cat([queue, keys[:room]], dim=0)
            keys = keys[room:]
            self.pointers[class_index] = queue.shape[0] % capacity
        if keys.shape[0]:  # full: overwrite the oldest entries, wrapping around
            start = int(self.pointers[class_index])
            slots = (torch.arange(keys.shape[0], device=queue.device) + start) % capacity
            queue[slots] = keys
            self.pointers[class_index] = (start + keys.shape[0]) % capacity
        setattr(self, name, queue)
        return count

    def sample(self, class_index: int, count: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``count`` entries of one class drawn uniformly with replacement ``(count, dim)``, as float32."""
        queue = self.queue(class_index)
        if queue.shape[0] == 0:
            raise ValueError(f"the queue of class {class_index} is empty")
        index = torch.randint(queue.shape[0], (count,), generator=generator).to(queue.device)
        return queue[index].float()

    def nbytes(self) -> int:
        """Bytes held by the queues (what they add to a checkpoint)."""
        return sum(self.queue(c).numel() * self.queue(c).element_size() for c in range(self.num_classes))

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        # queues grow, so a checkpoint's queue may be longer or shorter than this module's: take its shape
        for index in range(self.num_classes):
            key = f"{prefix}queue_{index}"
            if key not in state_dict:
                continue
            incoming = state_dict[key]
            if incoming.ndim != 2 or incoming.shape[1] != self.dim or incoming.shape[0] > self.capacities[index]:
                raise ConfigError(
                    f"checkpoint entry {key} has shape {tuple(incoming.shape)} but this run's queue holds at most "
                    f"({self.capacities[index]}, {self.dim}); use the queue sizes of the run that wrote it"
                )
            current = self.queue(index)
            setattr(self, f"queue_{index}", current.new_zeros((incoming.shape[0], self.dim)))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
