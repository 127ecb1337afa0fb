"""One DataModule for every method.

``train_dataloader()`` returns a Lightning ``CombinedLoader`` over ``{"labeled": ..., "unlabeled": ...}``
in ``max_size_cycle`` mode: the shorter loader (usually the labeled one) cycles, which is what the UAPS
code calls over-sampling the labeled samples. A batch therefore looks like::

    {"labeled":   {"image": (B_l, C, H, W) float, "mask": (B_l, H, W) int64, "id": [str]},
     "unlabeled": {"image": (B_u, C, H, W) float, <views the method asked for>, "id": [str]}}

Unlabeled samples never carry a mask. Methods that use no unlabeled data (``supervised``) get only the
``labeled`` key. Validation and test batches are ``{"image", "mask", "id"}``.

Native resolution (``crop_size``): training images (labeled and unlabeled) are random ``crop_size`` patches at
the image's own resolution times ``scale`` instead of resized images. With ``native_eval`` (set by
``evaluation.sliding_window``), validation, test and prediction images keep that resolution too; since
images of one dataset may differ in size, those loaders then hold **one image per batch** and the sliding
window (:mod:`semiseg.inference`) batches the tiles of each image instead (``evaluation.window_batch_size``).

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

from semiseg.data.datasets.base import DamagedImageError, DefectDataset, Sample
from semiseg.data.partial import LabelStore, PartialLabels, StoreDataset
from semiseg.data.resumable import ResumableDataLoader, ResumableRandomSampler
from semiseg.data.split import Split, check_split_ids, make_split
from semiseg.data.transforms import ViewMaker
from semiseg.errors import ConfigError, DataError, check_choice

log = logging.getLogger(__name__)

DAMAGED_IMAGES = ("stop", "skip")


class SplitDataset(Dataset):
    """The samples of one part of the split, loaded and turned into views.

    Args:
        dataset: the dataset that loads files.
        samples: the samples of this part.
        views: the :class:`ViewMaker` producing this part's tensors.
        with_masks: whether samples carry their masks (``False`` for the unlabeled part).
    """

    def __init__(
        self,
        dataset: DefectDataset,
        samples: Sequence[Sample],
        views: ViewMaker,
        with_masks: bool,
        damaged_images: str = "stop",
    ) -> None:
        self.dataset = dataset
        self.samples = list(samples)
        self.views = views
        self.with_masks = with_masks
        self.damaged_images = damaged_images
        self._warned: set[str] = set()

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        """The sample's views; with ``damaged_images="skip"`` a damaged image is replaced by the next sample's
        (a warning names it once), otherwise it stops the run."""
        for offset in range(len(self.samples)):
            try:
                return self._item((index + offset) % len(self.samples))
            except DamagedImageError as error:
                if self.damaged_images != "skip":
                    raise
                if str(error) not in self._warned:
                    self._warned.add(str(error))
                    log.warning("skipping a damaged image (data.damaged_images=skip): %s", str(error).split(": ")[0])
        raise DataError(f"every image of this part of dataset '{self.dataset.name}' is damaged")

    def _item(self, index: int) -> dict[str, Any]:
        sample = self.samples[index]
        if not self.with_masks:
            sample = Sample(sample.id, sample.image, None, sample.classes)
        image, mask = self.dataset.load(sample)
        item: dict[str, Any] = self.views(image, mask)
        item["id"] = sample.id
        return item


def resolve_num_workers(num_workers: int | str) -> int:
    """``"auto"``: one worker per spare core, at most 4 (0 on a single-core machine), and 0 inside a joblib
    multirun, whose parallel jobs already fill the cores (and whose loky worker processes cannot start loader
    workers: ``AttributeError: 'Process' object has no attribute 'env'``)."""
    if num_workers == "auto":
        from semiseg.sweeps import parallel_jobs

        if parallel_jobs() > 1:
            return 0
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
        test_on_val: validate on the test part (``val = test``), as the UAPS Magnetic Tiles code does.
        crop_size: ``[height, width]`` of random training crops at native resolution; ``None``: resize.
        defect_crop_prob: probability of centring a labeled crop on a defect pixel.
        scale: resize factor applied before cropping and before native-size evaluation (``dataset.scale``).
        native_eval: evaluation images at their own (scaled) size, one per batch (``evaluation.sliding_window``).
        ignore_index, background_index: padding value of masks, and the class that is not a defect.
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
        test_on_val: bool = False,
        crop_size: Sequence[int] | None = None,
        defect_crop_prob: float = 0.0,
        scale: float = 1.0,
        native_eval: bool = False,
        ignore_index: int = 255,
        background_index: int = 0,
        damaged_images: str = "stop",
    ) -> None:
        super().__init__()
        check_choice("data.damaged_images", damaged_images, DAMAGED_IMAGES)
        self.damaged_images = damaged_images
        self.test_on_val = bool(test_on_val)
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
        self.native_eval = bool(native_eval)
        if crop_size is not None and not self.native_eval:
            raise ConfigError(
                f"data.crop_size={list(crop_size)} trains at native resolution but evaluation would resize to "
                f"dataset.image_size; add evaluation.sliding_window=true"
            )
        self.batch_size_eval = 1 if self.native_eval else batch_size_eval
        if self.native_eval and batch_size_eval != 1:
            log.info("evaluation at native size: one image per batch (its tiles are batched instead)")
        self.num_workers = resolve_num_workers(num_workers)
        self.use_unlabeled = use_unlabeled
        self.pin_memory = torch.cuda.is_available() if pin_memory == "auto" else bool(pin_memory)
        augmentation = augmentation or {}
        common = {"image_size": image_size, "mean": mean, "std": std, "in_channels": dataset.in_channels}
        native = {"scale": scale, "ignore_index": ignore_index, "background_index": background_index}
        crops = {**native, "crop_size": crop_size}
        self.labeled_views = ViewMaker(
            **common, **crops, weak=augmentation.get("weak"), defect_crop_prob=defect_crop_prob
        )
        self.unlabeled_views = ViewMaker(
            **common,
            **crops,
            weak=augmentation.get("weak"),
            strong=augmentation.get("strong"),
            views=unlabeled_views,
            cutmix=cutmix,
        )
        self.eval_views = ViewMaker(**common, **native, native=self.native_eval)
        self.crop_size = list(crop_size) if crop_size is not None else None
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
            made_at = split.meta.get("labeled_ratio")
            if made_at is not None and float(made_at) != float(labeled_ratio):
                raise ConfigError(
                    f"split_file={split_file} was made with labeled_ratio={made_at} but labeled_ratio={labeled_ratio}: "
                    f"the file decides which images are labeled; use labeled_ratio={made_at} with it, or leave out "
                    "split_file to make a split of the new ratio"
                )
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
            test_on_val=self.test_on_val,
        )

    def save_split(self, path: str | Path) -> None:
        self.split.save(path)

    # ---- partial labels -------------------------------------------------------------------------
    def enable_label_store(self) -> LabelStore:
        """The store of the labeled images' current labels, created on first call (methods that grow labels
        call this in ``setup``; with ``partial_labels.mode: none`` the masks are stored as they are)."""
        if self.label_store is None:
            if self.crop_size is not None or self.native_eval:
                raise ConfigError(
                    "partial labels and methods that grow labels (cps_rg) keep them in a store at dataset.image_size "
                    "and do not train on native-resolution crops: drop data.crop_size and evaluation.sliding_window"
                )
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
            damaged_images=self.damaged_images,
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
