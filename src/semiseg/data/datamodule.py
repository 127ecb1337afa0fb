"""One DataModule for every method.

``train_dataloader()`` returns a Lightning ``CombinedLoader`` over ``{"labeled": ..., "unlabeled": ...}``
in ``max_size_cycle`` mode: the shorter loader (usually the labeled one) cycles, which is what the UAPS
code calls over-sampling the labeled samples. A batch therefore looks like::

    {"labeled":   {"image": (B_l, C, H, W) float, "mask": (B_l, H, W) int64, "id": [str]},
     "unlabeled": {"image": (B_u, C, H, W) float, <views the method asked for>, "id": [str]}}

Unlabeled samples never carry a mask. Methods that use no unlabeled data (``supervised``) get only the
``labeled`` key. Validation and test batches are ``{"image", "mask", "id"}``.

Partial labels (``partial_labels``, see :mod:`semiseg.data.partial`): the labeled images' masks then come
from a :class:`~semiseg.data.partial.LabelStore` (partial, possibly grown by the method), labeled batches
also carry ``index`` (the row in the store), the store is saved in checkpoints, and a run may have no
unlabeled image at all (``labeled_ratio=1``: every image partially labeled).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import CombinedLoader
from torch.utils.data import DataLoader, Dataset

from semiseg.data.datasets.base import DefectDataset, Sample
from semiseg.data.partial import LabelStore, PartialLabels, StoreDataset
from semiseg.data.resumable import ResumableDataLoader, ResumableRandomSampler
from semiseg.data.split import Split, check_split_ids, make_split
from semiseg.data.transforms import ViewMaker
from semiseg.errors import ConfigError

log = logging.getLogger(__name__)


class SplitDataset(Dataset):
    """The samples of one part of the split, loaded and turned into views.

    Args:
        dataset: the dataset that loads files.
        samples: the samples of this part.
        views: the :class:`ViewMaker` producing this part's tensors.
        with_masks: whether samples carry their masks (``False`` for the unlabeled part).
    """

    def __init__(self, dataset: DefectDataset, samples: Sequence[Sample], views: ViewMaker, with_masks: bool) -> None:
        self.dataset = dataset
        self.samples = list(samples)
        self.views = views
        self.with_masks = with_masks

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.samples[index]
        if not self.with_masks:
            sample = Sample(sample.id, sample.image, None, sample.classes)
        image, mask = self.dataset.load(sample)
        item: dict[str, Any] = self.views(image, mask)
        item["id"] = sample.id
        return item


def resolve_num_workers(num_workers: int | str) -> int:
    """``"auto"``: one worker per spare core, at most 4 (0 on a single-core machine)."""
    if num_workers == "auto":
        return max(0, min(4, (os.cpu_count() or 1) - 1))
    if not isinstance(num_workers, int) or num_workers < 0:
        raise ConfigError(f"data.num_workers={num_workers!r} must be a non-negative integer or 'auto'")
    return num_workers


class SemiSupervisedDataModule(L.LightningDataModule):
    """Split, augment and batch a :class:`DefectDataset` for semi-supervised training.

    Args:
        dataset: the dataset (its pools are split here).
        labeled_ratio: share of the training images that keep their masks, ``0 < r <= 1``.
        split_seed: seed of the split (never the training seed).
        val_fraction, test_fraction: held-out shares (each only without an official val / test split).
        image_size, mean, std: resizing and normalisation of the dataset.
        augmentation: ``{"weak": [...], "strong": [...]}`` albumentations transform configs.
        batch_size_labeled, batch_size_unlabeled, batch_size_eval: batch sizes.
        num_workers: loader workers per loader, or ``"auto"``.
        use_unlabeled: whether the method consumes unlabeled batches.
        unlabeled_views: views of each unlabeled image the method asks for (see ``transforms.KNOWN_VIEWS``).
        cutmix: parameters of ``cutmix_box`` views.
        split_file: reuse this ``split.json`` instead of making a split.
        pin_memory: ``"auto"`` pins when CUDA is available.
        partial_labels: the ``partial_labels`` config (``mode: none`` keeps full masks).
        seed: seed of the training loaders' order (the run's ``seed``; never the split).
    """

    def __init__(
        self,
        dataset: DefectDataset,
        labeled_ratio: float,
        split_seed: int,
        val_fraction: float,
        test_fraction: float,
        image_size: Sequence[int],
        mean: Sequence[float],
        std: Sequence[float],
        augmentation: dict | None = None,
        batch_size_labeled: int = 8,
        batch_size_unlabeled: int = 8,
        batch_size_eval: int = 16,
        num_workers: int | str = "auto",
        use_unlabeled: bool = True,
        unlabeled_views: Sequence[str] = ("image",),
        cutmix: dict | None = None,
        split_file: str | None = None,
        pin_memory: bool | str = "auto",
        partial_labels: dict | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        for key, value in (
            ("batch_size_labeled", batch_size_labeled),
            ("batch_size_unlabeled", batch_size_unlabeled),
            ("batch_size_eval", batch_size_eval),
        ):
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"data.{key}={value!r} must be a positive integer")
        if len(image_size) != 2 or min(image_size) < 1:
            raise ConfigError(f"dataset.image_size={list(image_size)} must be [height, width]")
        self.dataset = dataset
        self.seed = int(seed)
        self.batch_size_labeled = batch_size_labeled
        self.batch_size_unlabeled = batch_size_unlabeled
        self.batch_size_eval = batch_size_eval
        self.num_workers = resolve_num_workers(num_workers)
        self.use_unlabeled = use_unlabeled
        self.pin_memory = torch.cuda.is_available() if pin_memory == "auto" else bool(pin_memory)
        augmentation = augmentation or {}
        common = {"image_size": image_size, "mean": mean, "std": std, "in_channels": dataset.in_channels}
        self.labeled_views = ViewMaker(**common, weak=augmentation.get("weak"))
        self.unlabeled_views = ViewMaker(
            **common,
            weak=augmentation.get("weak"),
            strong=augmentation.get("strong"),
            views=unlabeled_views,
            cutmix=cutmix,
        )
        self.eval_views = ViewMaker(**common)
        self.image_size = list(image_size)
        self.partial_labels = PartialLabels.from_config(partial_labels)
        self.label_store: LabelStore | None = None
        self._label_store_loader: DataLoader | None = None
        self.split = self._make_split(labeled_ratio, split_seed, val_fraction, test_fraction, split_file)
        by_id = {s.id: s for s in self._all_samples()}
        self.parts = {
            part: [by_id[i] for i in getattr(self.split, part)] for part in ("labeled", "unlabeled", "val", "test")
        }
        if self.partial_labels.active:
            self.enable_label_store()
        if use_unlabeled and not self.parts["unlabeled"] and not self.partial_labels.active:
            raise ConfigError(
                f"labeled_ratio={labeled_ratio} leaves no unlabeled image for a semi-supervised method; "
                "lower labeled_ratio or use method=supervised"
            )

    def _all_samples(self) -> list[Sample]:
        return [
            *self.dataset.train_samples,
            *(self.dataset.test_samples or []),
            *(self.dataset.val_samples or []),
            *self.dataset.extra_unlabeled_samples,
        ]

    def _make_split(
        self, labeled_ratio: float, split_seed: int, val_fraction: float, test_fraction: float, split_file: str | None
    ) -> Split:
        if split_file:
            split = Split.load(split_file)
            check_split_ids(split, {s.id for s in self._all_samples()}, f"split_file={split_file}")
            return split
        return make_split(
            self.dataset.train_samples,
            self.dataset.test_samples,
            labeled_ratio,
            split_seed,
            val_fraction,
            test_fraction,
            extra_unlabeled=self.dataset.extra_unlabeled_samples,
            val_pool=self.dataset.val_samples,
        )

    def save_split(self, path: str | Path) -> None:
        self.split.save(path)

    # ---- partial labels -------------------------------------------------------------------------
    def enable_label_store(self) -> LabelStore:
        """The store of the labeled images' current labels, created on first call (methods that grow labels
        call this in ``setup``; with ``partial_labels.mode: none`` the masks are stored as they are)."""
        if self.label_store is None:
            spec = self.partial_labels if self.partial_labels.active else PartialLabels(mode="given")
            self.label_store = LabelStore(
                self.dataset, self.parts["labeled"], self.image_size, spec, share_memory=self.num_workers > 0
            )
        return self.label_store

    def label_store_dataloader(self) -> DataLoader:
        """The labeled images with evaluation views (resize + normalisation) and their store ``index``."""
        store = self.enable_label_store()
        store.fill()
        if self._label_store_loader is None:  # kept: its persistent workers serve every growth
            self._label_store_loader = self._loader(StoreDataset(store, self.eval_views), self.batch_size_eval, False)
        return self._label_store_loader

    def state_dict(self) -> dict[str, Any]:
        return {"label_store": self.label_store.state_dict()} if self.label_store is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "label_store" in state_dict:
            self.enable_label_store().load_state_dict(state_dict["label_store"])

    # ---- datasets and loaders -------------------------------------------------------------------
    def part_dataset(self, part: str, views: ViewMaker | None = None, with_masks: bool | None = None) -> SplitDataset:
        """The :class:`SplitDataset` of one part (``labeled``, ``unlabeled``, ``val``, ``test``)."""
        default_views = {"labeled": self.labeled_views, "unlabeled": self.unlabeled_views}.get(part, self.eval_views)
        return SplitDataset(
            self.dataset,
            self.parts[part],
            views or default_views,
            with_masks=(part != "unlabeled") if with_masks is None else with_masks,
        )

    def _loader(self, dataset: Dataset, batch_size: int, train: bool, stream: int = 0) -> DataLoader:
        if train:
            # at least one full batch even when the part is smaller than the batch; resumable mid-epoch
            sampler = ResumableRandomSampler(
                dataset, len(dataset), seed=self.seed * 2 + stream, min_per_rank=batch_size
            )
            return ResumableDataLoader(
                dataset,
                sampler=sampler,
                batch_size=batch_size,
                drop_last=True,
                num_workers=self.num_workers,
                persistent_workers=self.num_workers > 0,
                pin_memory=self.pin_memory,
            )
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=self.pin_memory,
        )

    def train_dataloader(self) -> CombinedLoader:
        if self.label_store is not None:
            self.label_store.fill()
            labeled: Dataset = StoreDataset(self.label_store, self.labeled_views)
        else:
            labeled = self.part_dataset("labeled")
        loaders = {"labeled": self._loader(labeled, self.batch_size_labeled, train=True)}
        if self.use_unlabeled and self.parts["unlabeled"]:
            loaders["unlabeled"] = self._loader(
                self.part_dataset("unlabeled"), self.batch_size_unlabeled, train=True, stream=1
            )
        return CombinedLoader(loaders, mode="max_size_cycle")

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.part_dataset("val"), self.batch_size_eval, train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.part_dataset("test"), self.batch_size_eval, train=False)

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()
