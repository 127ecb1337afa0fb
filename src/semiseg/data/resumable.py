"""Training loaders that can stop mid-epoch and continue exactly where they were.

Lightning saves the ``state_dict()`` of every training loader in the checkpoint and hands it back through
``load_state_dict()`` before the resumed run iterates, when the loader implements both. The state here is
the loader's own random generator, the seed of the current pass's order, how many batches of the pass
were consumed and, when the augmentations run in this process (``num_workers=0``), their random states.

:class:`ResumableRandomSampler` is a :class:`~torch.utils.data.DistributedSampler` (so Lightning does not
wrap it under DDP): it shards one permutation across ranks itself.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler


class ResumableRandomSampler(DistributedSampler):
    """``num_samples`` indices per pass (whole permutations, then part of one), drawn from its own generator
    seeded with ``seed``; each rank takes every ``world_size``-th index of the same order.

    Args:
        dataset: the dataset to sample from.
        num_samples: indices per pass over all ranks (usually ``len(dataset)``).
        seed: seed of the sampler's generator (the run's ``seed``).
        min_per_rank: at least this many indices per rank (one full batch even for a tiny labeled part).
    """

    def __init__(self, dataset: Dataset, num_samples: int, seed: int, min_per_rank: int = 1) -> None:
        distributed = dist.is_available() and dist.is_initialized()
        super().__init__(
            dataset,
            num_replicas=dist.get_world_size() if distributed else 1,
            rank=dist.get_rank() if distributed else 0,
            shuffle=True,
            seed=seed,
        )
        self.total_samples = max(int(num_samples), int(min_per_rank) * self.num_replicas)
        self.generator = torch.Generator()
        self.generator.manual_seed(int(seed))
        self.order_seed: int | None = None
        self.pending: tuple[int, int] | None = None  # (order seed, start index) of a resumed pass

    def __len__(self) -> int:
        return math.ceil(self.total_samples / self.num_replicas)

    def order(self, order_seed: int) -> list[int]:
        """This rank's indices of the pass with ``order_seed``."""
        generator = torch.Generator()
        generator.manual_seed(order_seed)
        size = len(self.dataset)  # type: ignore[arg-type]
        whole, rest = divmod(self.total_samples, size)
        chunks = [torch.randperm(size, generator=generator) for _ in range(whole)]
        if rest:
            chunks.append(torch.randperm(size, generator=generator)[:rest])
        indices = torch.cat(chunks).tolist()
        padded = len(self) * self.num_replicas
        indices += indices[: padded - len(indices)]
        return indices[self.rank : padded : self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        if self.pending is not None:
            order_seed, start = self.pending
            self.pending = None
        else:
            order_seed, start = int(torch.randint(0, 2**62, (1,), generator=self.generator).item()), 0
        self.order_seed = order_seed
        return iter(self.order(order_seed)[start:])


def _generators(pipeline: Any) -> list[Any]:
    """Every albumentations object (Compose, transforms, nested composes) of ``pipeline`` in a fixed order."""
    found = [pipeline]
    for child in getattr(pipeline, "transforms", []) or []:
        found.extend(_generators(child))
    return found


def augmentation_state(views: Any) -> dict[str, Any] | None:
    """Random states of a :class:`~semiseg.data.transforms.ViewMaker` (``None`` if it has none)."""
    if views is None or not hasattr(views, "geometry"):
        return None
    states = []
    for pipeline in (views.geometry, views.strong):
        for item in _generators(pipeline):
            numpy_rng = getattr(item, "random_generator", None)
            python_rng = getattr(item, "py_random", None)
            states.append(
                (
                    numpy_rng.bit_generator.state if isinstance(numpy_rng, np.random.Generator) else None,
                    python_rng.getstate() if isinstance(python_rng, random.Random) else None,
                )
            )
    return {"seeded_with": views._seeded_with, "pipelines": states, "rng": views.rng.bit_generator.state}


def set_augmentation_state(views: Any, state: dict[str, Any] | None) -> None:
    if views is None or not state or state.get("seeded_with") is None:
        return
    items = [item for pipeline in (views.geometry, views.strong) for item in _generators(pipeline)]
    if len(items) != len(state["pipelines"]):
        return  # another augmentation config: keep the fresh seeding
    for item, (numpy_state, python_state) in zip(items, state["pipelines"], strict=True):
        if numpy_state is not None:
            item.random_generator.bit_generator.state = numpy_state
        if python_state is not None:
            item.py_random.setstate(python_state)
    views.rng.bit_generator.state = state["rng"]
    views._seeded_with = state["seeded_with"]


class ResumableDataLoader(DataLoader):
    """A training :class:`DataLoader` over a :class:`ResumableRandomSampler` with ``state_dict`` /
    ``load_state_dict``, so a run stopped mid-epoch continues with the very next batch."""

    def __init__(self, dataset: Dataset, *, sampler: ResumableRandomSampler, **kwargs: Any) -> None:
        # its own generator for the workers' base seed, so creating an iterator never draws from (and
        # shifts) the global torch RNG; its state at the start of each pass is saved, so a resumed pass
        # gives its workers the same seeds
        if kwargs.get("generator") is None:
            kwargs["generator"] = torch.Generator()
            kwargs["generator"].manual_seed(int(sampler.generator.initial_seed()) + 1)
        super().__init__(dataset, sampler=sampler, **kwargs)
        self.resumable_sampler = sampler
        self.batches_done = 0
        self._resume_batches = 0
        self._pass_start_state = self.generator.get_state()
        self.epoch_ended = False  # set by loaders_at_epoch_end while a checkpoint at an epoch's end is saved

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        self.batches_done, self._resume_batches = self._resume_batches, 0
        self._pass_start_state = self.generator.get_state()
        for batch in super().__iter__():
            self.batches_done += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        """Where this loader is: the pass it is in and how many of its batches were consumed.

        A pass whose every batch was consumed, and any pass when the training epoch ends at this step
        (``epoch_ended``: Lightning then iterates every loader afresh, abandoning the rest of a pass of the
        shorter, cycled loader), is saved as finished: no ``order_seed``, the generators as they are now. The
        resumed loader then starts the next pass, exactly as this one would have. (Saved as "this pass, k
        batches done", a resumed loader would finish a pass the uninterrupted run abandoned, or first yield
        an empty pass, which ends the epoch at once.)
        """
        views = getattr(self.dataset, "views", None) if self.num_workers == 0 else None
        finished = self.epoch_ended or self.batches_done >= len(self)
        return {
            "loader_generator": self.generator.get_state() if finished else self._pass_start_state,
            "generator": self.resumable_sampler.generator.get_state(),
            "order_seed": None if finished else self.resumable_sampler.order_seed,
            "batches_done": 0 if finished else self.batches_done,
            "augmentation": augmentation_state(views),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.resumable_sampler.generator.set_state(state["generator"])
        self.generator.set_state(state["loader_generator"])
        finished = state["batches_done"] * int(self.batch_size or 1) >= len(self.resumable_sampler)
        if state["order_seed"] is not None and not finished:  # (older checkpoints saved finished passes so)
            self.resumable_sampler.pending = (state["order_seed"], state["batches_done"] * int(self.batch_size or 1))
            self._resume_batches = state["batches_done"]
        if self.num_workers == 0:
            set_augmentation_state(getattr(self.dataset, "views", None), state.get("augmentation"))


@contextmanager
def loaders_at_epoch_end(loaders: Iterable[Any], ended: bool) -> Iterator[None]:
    """While a checkpoint is saved: tell the :class:`ResumableDataLoader` s among ``loaders`` whether the
    training epoch ends at this step (then each saves its pass as finished, see ``state_dict``)."""
    resumable = [loader for loader in loaders if isinstance(loader, ResumableDataLoader)]
    for loader in resumable:
        loader.epoch_ended = ended
    try:
        yield
    finally:
        for loader in resumable:
            loader.epoch_ended = False
