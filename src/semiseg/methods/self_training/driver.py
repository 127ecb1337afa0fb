"""The generation loop of the self-training family (IM, IM+, AIM+, IM++, AIM++, Noisy Student, the ensembles,
Consistency Loss, ALDT): ``python -m semiseg.train method=im`` hands the run to :func:`run_self_training`.

Generation 0 trains ``students_per_generation`` students from scratch on the labeled images (plus
``labeled_copies`` augmented copies of each: ALDT/AIM). Every later generation ``g``:

1. the best ``num_teachers`` students of generation ``g-1`` (by the validation metric) label the unlabeled
   images offline (``pseudo_labeler``: ``inconsistency_mask``, ``model_ensemble``, ``input_ensemble``,
   ``single``, or ``none``); EvalNet, when configured, scores them and sets how many copies of each enter the
   training set; with ``offline_copy`` every pseudo-labeled item is a fixed augmented copy;
2. ``students_per_generation`` students are trained from scratch (or, with ``finetune_best``, from the best
   previous student's weights; each a normal Lightning fit of the method's module) on the labeled ground truth
   plus the pseudo-labels.

Run directory::

    split.json  config.yaml  results.json         # results.json gains a "generations" list
    generations.csv                               # one row per finished generation
    evalnet/model_<i>.pt evalnet/evalnet.json     # IM++ / AIM++ only
    generation_<g>/pseudo_labels.npz              # g > 0: ids, labels, masks, copies, scores
    generation_<g>/pseudo_labels.json             # coverage, IoU vs the hidden ground truth (diagnostic)
    generation_<g>/student_<j>/{checkpoints/, csv/, config.yaml, model.pt, student.json}
    generation_<g>/generation.json

Resuming: run the same command with ``hydra.run.dir=<the run dir>``. Finished students (``student.json``)
and pseudo-labels are reused, an interrupted student continues from its ``checkpoints/last.ckpt``.
"""

from __future__ import annotations

import copy
import json
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from semiseg.data.datamodule import SplitDataset
from semiseg.errors import ConfigError, check_choice
from semiseg.io import atomic_write_json, atomic_write_text
from semiseg.methods.self_training.data import SelfTrainingDataModule
from semiseg.methods.self_training.evalnet import EvalNetSetting, filter_with_evalnet
from semiseg.methods.self_training.masks import (
    ENSEMBLE_VOTES,
    INPUT_ENSEMBLE_MODES,
    MORPH_ORDERS,
    filter_bad_predictions,
    inconsistency_mask,
    input_ensemble_probs,
    model_ensemble,
    morph_mask,
    random_view_labels,
)
from semiseg.methods.self_training.offline_augment import PhotometricNoise, offline_copy_noise
from semiseg.methods.self_training.pseudo_label_store import PseudoLabels, pseudo_label_quality
from semiseg.methods.self_training.student import Student
from semiseg.results import CONFIG_FILE, RESULTS_FILE, SPLIT_FILE, checkpoint_step, number, relative_path, run_identity
from semiseg.resume import last_checkpoint
from semiseg.runner import apply_performance, build_module, fit_and_test

log = logging.getLogger("semiseg.self_training")

PSEUDO_LABELERS = ("inconsistency_mask", "model_ensemble", "input_ensemble", "single", "none")
# keys of the method config that configure the loop, not the student module
LOOP_KEYS = (
    "driver",
    "generations",
    "num_teachers",
    "students_per_generation",
    "pseudo_labeler",
    "binary_threshold",
    "dilate_kernel",
    "erode_kernel",
    "labeled_copies",
    "masked_input",
    "noisy_student",
    "offline_copy",
    "input_ensemble",
    "evalnet",
    "finetune_best",
    "filter_bad_predictions",
    "ensemble_vote",
    "morph_order",
)
NOISY_STUDENT_KEYS = ("width_multiplier", "dropout", "input_noise_std", "strong_augmentation_prob")
# model keys that Noisy Student's dropout schedule sets (im_unet's; other models keep their dropout)
DROPOUT_KEYS = ("dropout", "dropout_encoder", "dropout_bottleneck", "dropout_decoder")
STUDENT_FILE = "student.json"
WEIGHTS_FILE = "model.pt"
PSEUDO_FILE = "pseudo_labels.npz"
PSEUDO_SUMMARY_FILE = "pseudo_labels.json"
GENERATION_FILE = "generation.json"
GENERATION_TABLE = "generations.csv"


@dataclass
class LoopOptions:
    """The loop's settings (``method.<key>``); see ``conf/method/im.yaml`` for their meaning."""

    generations: int = 5
    num_teachers: int = 2
    students_per_generation: int = 5
    pseudo_labeler: str = "inconsistency_mask"
    binary_threshold: float = 0.5
    dilate_kernel: int = 0
    erode_kernel: int = 0
    labeled_copies: int = 0
    masked_input: str = "black"
    filter_bad_predictions: bool = True
    ensemble_vote: str = "mean"
    morph_order: str = "erode_dilate"
    noisy_student: dict[str, list[float]] | None = None
    offline_copy: dict[str, Any] | None = None
    input_ensemble: dict[str, Any] | None = None
    finetune_best: bool = False
    evalnet: dict[str, Any] | None = None
    fast_dev_run: bool = False

    @classmethod
    def from_config(cls, method: Mapping[str, Any], fast_dev_run: bool = False) -> LoopOptions:
        values = {key: method[key] for key in LOOP_KEYS if key in method and key != "driver"}
        options = cls(**values, fast_dev_run=fast_dev_run)
        options.check()
        if fast_dev_run:  # check the whole pipeline cheaply: one student generation, just enough students
            options.generations = min(options.generations, 1)
            options.students_per_generation = max(1, options.num_teachers)
        return options

    def check(self) -> None:
        for key in ("generations", "num_teachers", "students_per_generation", "dilate_kernel", "erode_kernel"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"method.{key}={value!r} must be a non-negative integer")
        if self.num_teachers < 1 or self.students_per_generation < 1:
            raise ConfigError("method.num_teachers and method.students_per_generation must be at least 1")
        check_choice("method.pseudo_labeler", self.pseudo_labeler, PSEUDO_LABELERS)
        if self.pseudo_labeler == "inconsistency_mask" and self.num_teachers < 2:
            raise ConfigError(
                f"method.num_teachers={self.num_teachers}: an Inconsistency Mask needs 2 to 4 teachers; "
                "e.g. method.num_teachers=2"
            )
        if self.num_teachers > self.students_per_generation:
            raise ConfigError(
                f"method.num_teachers={self.num_teachers} exceeds method.students_per_generation="
                f"{self.students_per_generation}: the teachers are the best students of the previous generation"
            )
        check_choice("method.morph_order", self.morph_order, MORPH_ORDERS)
        check_choice("method.ensemble_vote", self.ensemble_vote, ENSEMBLE_VOTES)
        if not 0.0 < self.binary_threshold < 1.0:
            raise ConfigError(f"method.binary_threshold={self.binary_threshold} must lie in (0, 1)")
        for key, value in (self.noisy_student or {}).items():
            if key not in NOISY_STUDENT_KEYS:
                raise ConfigError(f"method.noisy_student.{key} is unknown; the schedule has {list(NOISY_STUDENT_KEYS)}")
            if value is not None and (not isinstance(value, list | tuple) or len(value) != 2):
                raise ConfigError(f"method.noisy_student.{key}={value!r} must be [first generation, last generation]")
        for generation in range(1, self.generations + 1):  # refuse bad tables before any student trains
            self.offline_noise(generation)
        self.input_ensemble_views()

    def input_ensemble_views(self) -> tuple[int, PhotometricNoise | None]:
        """``(views, noise)`` of the input ensemble (``method.input_ensemble``); noise ``None``: the 8 dihedral
        views (``mode: dihedral``, or no ``method.input_ensemble``)."""
        settings = dict(self.input_ensemble or {"mode": "dihedral"})
        mode = settings.pop("mode", "random")
        check_choice("method.input_ensemble.mode", mode, INPUT_ENSEMBLE_MODES)
        views = settings.pop("num_views", 5)
        if isinstance(views, bool) or not isinstance(views, int) or views < 1:
            raise ConfigError(f"method.input_ensemble.num_views={views!r} must be a positive integer (e.g. 3, 5, 7)")
        if mode == "dihedral":
            return 8, None
        try:
            noise = PhotometricNoise(**{k: tuple(v) if isinstance(v, list | tuple) else v for k, v in settings.items()})
        except TypeError:
            raise ConfigError(
                f"method.input_ensemble has unknown key(s) in {sorted(settings)}; it takes mode, num_views, max_blur, "
                "max_noise, brightness_alpha, brightness_beta, brightness_prob"
            ) from None
        except ConfigError as error:
            raise ConfigError(f"method.input_ensemble: {error}") from None
        return views, noise

    def offline_noise(self, generation: int) -> PhotometricNoise | None:
        """The offline copies' augmentation in ``generation`` (``None``: no offline copies, or generation 0)."""
        if self.offline_copy is None or generation == 0:
            return None
        return offline_copy_noise(self.offline_copy, generation)

    def schedule(self, generation: int) -> dict[str, float]:
        """Noisy Student's values in ``generation``: none in generation 0 (the LDT teachers keep the model's own
        width, so IM and IM+ start from the same teachers, as in the official code), then linear from the first
        value in generation 1 to the last in the last generation (5 generations of [0.5, 1.5]: the official
        widths 0.5, 0.75, 1, 1.25, 1.5; a single generation takes the last value)."""
        if not self.noisy_student or generation == 0:
            return {}
        share = (generation - 1) / (self.generations - 1) if self.generations > 1 else 1.0
        return {
            key: float(ends[0] + (ends[1] - ends[0]) * share)
            for key, ends in self.noisy_student.items()
            if ends is not None
        }

    def start(self, generation: int, teachers: list[dict[str, Any]], run_dir: Path) -> dict[str, Any]:
        """``finetune_best`` (the official Consistency Loss): generation 0 trains without the consistency term
        (the LDT students), later students start from the best previous student's weights."""
        if not self.finetune_best:
            return {}
        if generation == 0:
            return {"consistency_weight": 0.0}
        return {"init_weights": str(run_dir / teachers[0]["weights"])}


def student_seed(seed: int, generation: int, index: int) -> int:
    """A distinct, reproducible seed for every student of every generation."""
    return int(np.random.SeedSequence([seed, generation, index]).generate_state(1)[0])


def masked_label_value(cfg: DictConfig) -> int:
    """The target of inconsistency-masked pixels: ``ignore_index`` (``im_handling: ignore``, the paper), the
    background index (``background``, the official code's ``pred_mask[im > 0] = 0``) or the extra IM class
    index (``class``)."""
    handling = cfg.method.get("im_handling", "ignore")
    if handling == "class":
        return len(cfg.dataset.class_names)
    if handling == "background":
        return int(cfg.evaluation.background_index)
    return int(cfg.dataset.ignore_index)


def scheduled_dropout_keys(cfg: DictConfig) -> list[str]:
    """The model keys Noisy Student's dropout schedule sets; refuses a model that has none of them (it would
    silently train without the scheduled dropout)."""
    keys = [key for key in DROPOUT_KEYS if key in cfg.model]
    if not keys:
        raise ConfigError(
            f"method.noisy_student.dropout is set but model={cfg.model.name} has none of the dropout keys "
            f"{list(DROPOUT_KEYS)} it schedules (model=unet has a per-level encoder_dropout instead); use "
            "model=im_unet, or method.noisy_student.dropout=null (the official code uses no dropout)"
        )
    return keys


def student_config(
    cfg: DictConfig, output_dir: Path, schedule: Mapping[str, Any], seed: int | None = None
) -> DictConfig:
    """The config of one student: the run's, with its own output dir and ``seed`` (default: the run's), the loop
    keys removed, Noisy Student's width, dropout and input noise applied, and ``init_weights`` /
    ``consistency_weight`` of :meth:`LoopOptions.start` set."""
    student = copy.deepcopy(cfg)
    with open_dict(student):
        student.paths.output_dir = str(output_dir)
        if seed is not None:
            student.seed = seed
        for key in LOOP_KEYS:
            student.method.pop(key, None)
        if "width_multiplier" in schedule:
            factor = schedule["width_multiplier"]
            if "width_multiplier" in student.model:
                student.model.width_multiplier = float(student.model.width_multiplier) * factor
            elif "channels" in student.model:
                student.model.channels = [max(1, round(c * factor)) for c in student.model.channels]
            else:
                raise ConfigError(
                    f"method.noisy_student.width_multiplier needs a model with width_multiplier or channels; "
                    f"model={cfg.model.name} has neither (use model=im_unet or model=unet)"
                )
        if "dropout" in schedule:
            for key in scheduled_dropout_keys(cfg):
                student.model[key] = schedule["dropout"]
        for key in ("input_noise_std", "init_weights", "consistency_weight"):
            if key in schedule:
                student.method[key] = schedule[key]
    return student


class SelfTrainingRun:
    """One self-training experiment (all generations) in ``cfg.paths.output_dir``."""

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg
        self.output_dir = Path(cfg.paths.output_dir)
        self.options = LoopOptions.from_config(
            OmegaConf.to_container(cfg.method, resolve=True), bool(cfg.trainer.get("fast_dev_run"))
        )
        if self.options.schedule(self.options.generations).get("dropout") is not None:
            scheduled_dropout_keys(cfg)  # refuse before any student trains
        self.student_class = get_class(cfg.method._target_)
        if not issubclass(self.student_class, Student):
            raise ConfigError(
                f"method._target_={cfg.method._target_} is not a self-training Student; the generation loop "
                "trains semiseg.methods.self_training.student.Student (or a subclass)"
            )
        self.monitor = cfg.evaluation.monitor
        self.maximize = cfg.evaluation.mode == "max"
        self.datamodule = self._build_datamodule()
        self.device = self._device()
        self.seconds = 0.0

    # ---- setup --------------------------------------------------------------------------------------
    def _build_datamodule(self) -> SelfTrainingDataModule:
        dataset = instantiate(self.cfg.dataset.source, _convert_="all")
        data = OmegaConf.to_container(self.cfg.data, resolve=True)
        data.pop("_target_")
        datamodule = SelfTrainingDataModule(
            dataset=dataset,
            use_unlabeled=self.student_class.uses_unlabeled,
            unlabeled_views=list(self.student_class.views_for(self.cfg.method)),
            labeled_copies=self.options.labeled_copies,
            masked_input=self.options.masked_input,
            **data,
        )
        if not datamodule.parts["unlabeled"] and self.options.generations > 0:
            raise ConfigError(
                f"labeled_ratio={self.cfg.labeled_ratio} leaves no unlabeled image to pseudo-label; "
                "lower labeled_ratio or set method.generations=0"
            )
        datamodule.save_split(self.output_dir / SPLIT_FILE)
        return datamodule

    def evalnet_setting(self) -> EvalNetSetting:
        """What EvalNet (IM++ / AIM++) needs of this run; it keeps its files in ``<run>/evalnet``."""
        return EvalNetSetting(
            folder=self.output_dir / "evalnet",
            datamodule=self.datamodule,
            in_channels=int(self.cfg.dataset.in_channels),
            num_classes=len(self.cfg.dataset.class_names),
            ignore_index=int(self.cfg.dataset.ignore_index),
            accelerator=str(self.cfg.trainer.get("accelerator", "cpu")),
            device=self.device,
            fast_dev_run=self.options.fast_dev_run,
            ldt_students=self.ldt_students,
            binary_threshold=self.options.binary_threshold,
            background_index=int(self.cfg.evaluation.background_index),
            seed=int(self.cfg.seed),
        )

    def ldt_students(self) -> list[Any]:
        """``predict_logits`` of every generation-0 (LDT) student, for EvalNet's training data."""
        records = sorted((self.output_dir / "generation_0").glob(f"student_*/{STUDENT_FILE}"))
        return [self.load_student(json.loads(path.read_text())).predict_logits for path in records]

    def _device(self) -> torch.device:
        wants_gpu = str(self.cfg.trainer.get("accelerator", "cpu")) in ("gpu", "cuda", "auto")
        return torch.device("cuda" if wants_gpu and torch.cuda.is_available() else "cpu")

    # ---- one student ----------------------------------------------------------------------------------
    def train_student(self, generation: int, index: int, schedule: Mapping[str, Any]) -> dict[str, Any]:
        """Train (or reload, or resume) student ``index`` of ``generation``; return its record."""
        folder = self.output_dir / f"generation_{generation}" / f"student_{index}"
        record_path = folder / STUDENT_FILE
        if record_path.is_file():
            log.info("generation %d student %d: done earlier, reusing %s", generation, index, record_path)
            return json.loads(record_path.read_text())
        seed = student_seed(int(self.cfg.seed), generation, index)
        cfg = student_config(self.cfg, folder, schedule, seed)
        last = last_checkpoint(folder)
        resume = str(last) if last else None
        if resume:
            log.info("generation %d student %d: resuming from %s", generation, index, resume)
        results = fit_and_test(
            cfg, folder, datamodule=self.datamodule, ckpt_path=resume, resuming=bool(resume), weights_file=WEIGHTS_FILE
        )
        record = {
            "generation": generation,
            "student": index,
            "seed": seed,
            "val": results["best_val"]["value"],
            "best_step": results["best_val"]["step"],
            "test_metrics": results["metrics"],
            "steps": results["steps"],
            "train_seconds": results["train_seconds"],
            "checkpoint": relative_path(folder / results["checkpoint"], self.output_dir)
            if results["checkpoint"]
            else None,
            "weights": relative_path(folder / WEIGHTS_FILE, self.output_dir),
            "model": OmegaConf.to_container(cfg.model, resolve=True),
            "method_overrides": dict(schedule),
            "num_params": results["num_params"],
            "num_params_train": results["num_params_train"],
            "resumed_from": relative_path(resume, self.output_dir),
        }
        atomic_write_json(record_path, record)
        log.info("generation %d student %d: %s %s  test/mIoU %s", generation, index, self.monitor, record["val"],
                 record["test_metrics"].get("test/mIoU"))  # fmt: skip
        return record

    def load_student(self, record: Mapping[str, Any]) -> Student:
        """The trained network of a student record, in eval mode on the labelling device (with the fast paths
        it was trained with, so that the saved weights' names match)."""
        folder = self.output_dir / f"generation_{record['generation']}" / f"student_{record['student']}"
        overrides = {k: v for k, v in record.get("method_overrides", {}).items() if k != "init_weights"}
        cfg = student_config(self.cfg, folder, overrides, record["seed"])
        module = apply_performance(build_module(cfg), cfg.get("performance"))
        module.load_state_dict(torch.load(self.output_dir / record["weights"], map_location="cpu"))
        return module.to(self.device).eval()

    def rank(self, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Students best first by the validation metric (missing values last)."""

        def key(record: dict[str, Any]) -> float:
            value = record.get("val")
            if value is None:
                return math.inf
            return -value if self.maximize else value

        return sorted(records, key=key)

    # ---- pseudo-labels -------------------------------------------------------------------------------
    @torch.no_grad()
    def label_unlabeled(self, teachers: list[Student], generation: int = 1) -> PseudoLabels:
        """Run the teachers over the unlabeled images (resized, normalised, not augmented; the random input
        ensemble augments them itself)."""
        options = self.options
        num_views, view_noise = options.input_ensemble_views()
        rng = np.random.default_rng([int(self.cfg.seed), generation, 11])
        loader = self.datamodule._loader(
            self.datamodule.part_dataset("unlabeled", views=self.datamodule.eval_views, with_masks=False),
            self.datamodule.batch_size_eval,
            train=False,
        )
        ids: list[str] = []
        labels, masks, kept = [], [], []
        background = int(self.cfg.evaluation.background_index)
        normalise = self.datamodule.eval_views._tensor
        for batch in loader:
            image = batch["image"].to(self.device)
            keep = torch.ones(image.shape[0], dtype=torch.bool)
            if options.pseudo_labeler == "input_ensemble" and view_noise is not None:  # the best teacher's views
                label = torch.stack([
                    torch.from_numpy(random_view_labels(teachers[0].predict_logits, picture, normalise, view_noise,
                                                        num_views, rng, options.binary_threshold, self.device))
                    for picture in self.datamodule.denormalise(batch["image"])
                ])  # fmt: skip
                mask = torch.zeros_like(label, dtype=torch.bool)
            elif options.pseudo_labeler == "input_ensemble":
                probs = torch.stack([input_ensemble_probs(t.predict_logits, image) for t in teachers])
                label, mask = model_ensemble(probs, options.ensemble_vote, options.binary_threshold)
            else:
                probs = torch.stack([t.predict_logits(image).softmax(dim=1) for t in teachers])
                if options.pseudo_labeler == "inconsistency_mask":
                    label, raw_mask = inconsistency_mask(probs, options.binary_threshold)
                    mask = morph_mask(raw_mask, options.dilate_kernel, options.erode_kernel, options.morph_order)
                    if options.filter_bad_predictions and probs.shape[2] == 2:  # binary, as the official code
                        keep = filter_bad_predictions(label, raw_mask, background).cpu()
                else:
                    label, mask = model_ensemble(probs, options.ensemble_vote, options.binary_threshold)
            kept.append(keep)
            ids += list(batch["id"])
            labels.append(label.to(torch.uint8).cpu())
            masks.append(mask.cpu())
        count = len(ids)
        return PseudoLabels(
            ids=ids,
            labels=torch.cat(labels).numpy(),
            masks=torch.cat(masks).numpy(),
            copies=torch.cat(kept).long().numpy(),  # 0: dropped by the keep filter
            scores=np.full(count, np.nan, dtype=np.float32),
        )

    def hidden_ground_truth_quality(self, pseudo: PseudoLabels) -> dict[str, float | None]:
        """Diagnostic only (never used in training): pseudo-labels of the kept images vs their true masks."""
        datamodule = self.datamodule
        samples = [s for s in datamodule.parts["unlabeled"] if s.mask is not None]
        if not samples:
            return {"mIoU": None, "pixel_acc": None}
        rows = {sample_id: row for row, sample_id in enumerate(pseudo.ids)}
        part = SplitDataset(datamodule.dataset, samples, datamodule.eval_views, with_masks=True)
        loader = datamodule._loader(part, datamodule.batch_size_eval, train=False)
        truth, selected = [], []
        for batch in loader:
            truth.append(batch["mask"])
            selected += [rows[i] for i in batch["id"]]
        keep = [i for i, row in enumerate(selected) if pseudo.copies[row] > 0]
        if not keep:
            return {"mIoU": None, "pixel_acc": None}
        rows_kept = [selected[i] for i in keep]
        quality = pseudo_label_quality(
            torch.from_numpy(pseudo.labels[rows_kept]),
            torch.from_numpy(pseudo.masks[rows_kept]),
            torch.cat(truth)[keep],
            num_classes=len(self.cfg.dataset.class_names),
            ignore_index=int(self.cfg.dataset.ignore_index),
            background_index=int(self.cfg.evaluation.background_index),
        )
        return {key: number(value) for key, value in quality.items()}

    def pseudo_labels(self, generation: int, teacher_records: list[dict[str, Any]]) -> tuple[PseudoLabels, dict]:
        """The pseudo-labels of ``generation`` (made once, then reloaded) and their summary."""
        folder = self.output_dir / f"generation_{generation}"
        path, summary_path = folder / PSEUDO_FILE, folder / PSEUDO_SUMMARY_FILE
        if path.is_file() and summary_path.is_file():
            return PseudoLabels.load(path), json.loads(summary_path.read_text())
        teachers = [self.load_student(record) for record in teacher_records]
        pseudo = self.label_unlabeled(teachers, generation)
        summary: dict[str, Any] = {"labeler": self.options.pseudo_labeler, "images": len(pseudo)}
        if self.options.evalnet:
            summary["evalnet"] = filter_with_evalnet(self.evalnet_setting(), self.options.evalnet, pseudo)
        summary["kept"] = int((pseudo.copies > 0).sum())
        summary["training_items"] = int(pseudo.copies.sum())
        summary["coverage"] = round(pseudo.coverage, 6)
        summary["iou_vs_ground_truth"] = self.hidden_ground_truth_quality(pseudo)
        pseudo.save(path)
        atomic_write_json(summary_path, summary)
        return pseudo, summary

    # ---- the loop --------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        options = self.options
        atomic_write_text(self.output_dir / CONFIG_FILE, OmegaConf.to_yaml(self.cfg, resolve=True))
        generations: list[dict[str, Any]] = []
        teachers: list[dict[str, Any]] = []
        best: dict[str, Any] = {}
        for generation in range(options.generations + 1):
            schedule = {**options.schedule(generation), **options.start(generation, teachers, self.output_dir)}
            summary: dict[str, Any] | None = None
            if generation == 0 or options.pseudo_labeler == "none":
                self.datamodule.set_pseudo_labels(None)
            else:
                pseudo, summary = self.pseudo_labels(generation, teachers)
                im_value = masked_label_value(self.cfg)
                self.datamodule.set_pseudo_labels(
                    pseudo,
                    im_value,
                    schedule.get("strong_augmentation_prob", 0.0),
                    offline_noise=options.offline_noise(generation),
                    generation=generation,
                    offline_seed=int(self.cfg.seed),
                )
                log.info(
                    "generation %d pseudo-labels: coverage %.4f, kept %s/%s, IoU vs hidden ground truth %s",
                    generation, summary["coverage"], summary["kept"], summary["images"],
                    summary["iou_vs_ground_truth"].get("mIoU"),
                )  # fmt: skip
            records = [self.train_student(generation, j, schedule) for j in range(options.students_per_generation)]
            self.seconds += sum(r["train_seconds"] for r in records)
            ranked = self.rank(records)
            best = ranked[0]
            entry = {
                "generation": generation,
                "teachers": [{"generation": t["generation"], "student": t["student"]} for t in teachers],
                "pseudo_labels": summary,
                "schedule": dict(schedule),
                "students": [
                    {
                        "student": r["student"],
                        "seed": r["seed"],
                        self.monitor: r["val"],
                        "test/mIoU": r["test_metrics"].get("test/mIoU"),
                        "steps": r["steps"],
                        "num_params": r["num_params"],
                    }
                    for r in records
                ],
                "best_student": best["student"],
                self.monitor: best["val"],
                "test/mIoU": best["test_metrics"].get("test/mIoU"),
                "test/mDice": best["test_metrics"].get("test/mDice"),
                "pseudo_label_coverage": summary["coverage"] if summary else None,
                "pseudo_label_iou_vs_ground_truth": summary["iou_vs_ground_truth"]["mIoU"] if summary else None,
            }
            atomic_write_json(self.output_dir / f"generation_{generation}" / GENERATION_FILE, entry)
            generations.append(entry)
            self.write_generation_table(generations)
            log.info("generation %d: best student %d  %s %s  test/mIoU %s", generation, best["student"],
                     self.monitor, best["val"], entry["test/mIoU"])  # fmt: skip
            teachers = ranked[: options.num_teachers]
        results = self.results(best, generations)
        atomic_write_json(self.output_dir / RESULTS_FILE, results)
        return results

    def write_generation_table(self, generations: list[dict[str, Any]]) -> None:
        """``generations.csv``: one row per finished generation (the per-generation log)."""
        columns = ["generation", "best_student", self.monitor, "test/mIoU", "test/mDice",
                   "pseudo_label_coverage", "pseudo_label_iou_vs_ground_truth", "pseudo_labels_kept"]  # fmt: skip
        lines = [",".join(columns)]
        for entry in generations:
            kept = (entry["pseudo_labels"] or {}).get("kept")
            values = [entry.get(c) for c in columns[:-1]] + [kept]
            lines.append(",".join("" if v is None else str(v) for v in values))
        atomic_write_text(self.output_dir / GENERATION_TABLE, "\n".join(lines) + "\n")

    def results(self, best: dict[str, Any], generations: list[dict[str, Any]]) -> dict[str, Any]:
        """``results.json``: the suite's schema for the final generation's best student, plus ``generations``."""
        cfg = self.cfg
        checkpoint = best.get("checkpoint")
        return {
            **run_identity(cfg),
            "num_params": best["num_params"],
            "num_params_train": best["num_params_train"],
            "split": self.datamodule.split.sizes(),
            "metrics": best["test_metrics"],
            "best_val": {"metric": self.monitor, "value": best["val"], "step": best_step(best)},
            "steps": best["steps"],
            "train_seconds": round(self.seconds, 3),
            "checkpoint": checkpoint or best["weights"],
            "config": CONFIG_FILE,
            "final_student": {"generation": best["generation"], "student": best["student"]},
            "total_steps": sum(s["steps"] for g in generations for s in g["students"]),
            "generations": generations,
        }


def best_step(record: Mapping[str, Any]) -> int | None:
    """The step of a student's best checkpoint (records written before ``best_step`` was kept: from its name)."""
    return record["best_step"] if "best_step" in record else checkpoint_step(record.get("checkpoint"))


def run_self_training(cfg: DictConfig) -> dict[str, Any]:
    """Entry point used by ``semiseg.train``: run every generation; return ``results.json``'s content."""
    if cfg.data.get("crop_size") is not None or cfg.evaluation.get("sliding_window"):
        raise ConfigError(
            f"method={cfg.method.name} labels the unlabeled images at dataset.image_size between generations and "
            "does not train on native-resolution crops: drop data.crop_size and evaluation.sliding_window"
        )
    Path(cfg.paths.output_dir).mkdir(parents=True, exist_ok=True)
    L.seed_everything(cfg.seed, workers=True)
    return SelfTrainingRun(cfg).run()
