"""The pseudo-label diagnostic (semiseg.callbacks.PseudoLabelQuality): right on a hand case, logged by a real run,
and off the training path: the hidden masks never reach a training batch and the run is the same without it."""

from __future__ import annotations

import csv
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch

from conftest import compose_config
from semiseg.callbacks import PseudoLabelQuality
from semiseg.metrics import SegmentationMetrics
from semiseg.train import train

CLASSES = ["background", "a", "b"]
IGNORE = 255


class StubModule:
    """Just what the callback reads: val_metrics, device, diagnostic_pseudo_labels and log_dict."""

    def __init__(self, labels_of: dict[int, torch.Tensor], used_of: dict[int, torch.Tensor]) -> None:
        self.val_metrics = SegmentationMetrics(CLASSES, ignore_index=IGNORE)
        self.device = torch.device("cpu")
        self.labels_of, self.used_of = labels_of, used_of
        self.logged: dict[str, float] = {}

    def diagnostic_pseudo_labels(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        key = int(image[0, 0, 0, 0])
        return self.labels_of[key], self.used_of[key]

    def log_dict(self, values: dict[str, torch.Tensor], **_: object) -> None:
        self.logged.update({k: float(v) for k, v in values.items()})


def score(labels: torch.Tensor, used: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    callback = PseudoLabelQuality(num_images=1)
    image = torch.zeros(1, 1, *mask.shape[1:])
    callback._loader = [{"image": image, "mask": mask}]
    module = StubModule({0: labels}, {0: used})
    callback.on_validation_epoch_end(SimpleNamespace(sanity_checking=False), module)
    return module.logged


def test_hand_cases() -> None:
    mask = torch.tensor([[[0, 1, 1, 2], [0, 1, 2, 2]]])  # (1, 2, 4)
    everywhere = torch.ones_like(mask, dtype=torch.bool)
    perfect = score(mask.clone(), everywhere, mask)
    assert perfect == {"diag/pseudo_label_mIoU": 1.0, "diag/pseudo_label_mIoU_all_pixels": 1.0,
                       "diag/unsup_pixel_share": 1.0}  # fmt: skip
    # one pixel of class 1 called 2: IoU(a) = 2/3, IoU(b) = 3/4 over all pixels
    wrong = mask.clone()
    wrong[0, 0, 1] = 2
    logged = score(wrong, everywhere, mask)
    assert logged["diag/pseudo_label_mIoU_all_pixels"] == pytest.approx((2 / 3 + 3 / 4) / 2)
    # the loss leaves the wrong pixel out (below a threshold): perfect on the 7 used pixels of 8
    used = everywhere.clone()
    used[0, 0, 1] = False
    logged = score(wrong, used, mask)
    assert logged["diag/pseudo_label_mIoU"] == pytest.approx(1.0)
    assert logged["diag/unsup_pixel_share"] == pytest.approx(7 / 8)


class UnlabeledBatches(L.Callback):
    """Records the keys of every unlabeled training batch."""

    def __init__(self) -> None:
        self.keys: list[set[str]] = []

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        if batch.get("unlabeled") is not None:
            self.keys.append(set(batch["unlabeled"]))


def logged(run_dir: Path, key: str) -> list[tuple[str, str]]:
    with open(run_dir / "csv" / "metrics.csv", newline="") as file:
        return [(row["step"], row[key]) for row in csv.DictReader(file) if row.get(key)]


@pytest.mark.parametrize("method", ["fixmatch", "uaps"])
def test_off_the_training_path(method: str, tmp_path: Path, monkeypatch) -> None:
    from semiseg import runner

    watcher = UnlabeledBatches()
    build_callbacks = runner.build_callbacks
    monkeypatch.setattr(runner, "build_callbacks", lambda cfg, loggers: [*build_callbacks(cfg, loggers), watcher])
    common = (f"method={method}", "trainer.max_steps=4", "trainer.val_check_interval=2", "trainer.deterministic=true",
              "callbacks.prediction_overlays=null", "model.channels=[4,8,16,32,64]")  # fmt: skip
    without = compose_config([*common, "callbacks.pseudo_label_quality.num_images=0"], tmp_path / "without")
    with_diag = compose_config([*common, "callbacks.pseudo_label_quality.num_images=6"], tmp_path / "with")
    first, second = train(without), train(with_diag)
    assert watcher.keys and all("mask" not in keys for keys in watcher.keys), "a hidden mask reached training"
    run_without, run_with = Path(without.paths.output_dir), Path(with_diag.paths.output_dir)
    assert logged(run_with, "train/loss") == logged(run_without, "train/loss")
    assert first["metrics"] == second["metrics"]
    quality = logged(run_with, "diag/pseudo_label_mIoU")
    share = logged(run_with, "diag/unsup_pixel_share")
    assert [step for step, _ in quality] == [step for step, _ in share] and len(share) == 2  # every validation
    assert all(0.0 <= float(value) <= 1.0 for _, value in share)
    assert not logged(run_without, "diag/unsup_pixel_share")
