"""Native-resolution patches (data.crop_size) and sliding-window evaluation (semiseg.inference)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from semiseg.config import CONFIG_DIR
from semiseg.data.transforms import ViewMaker
from semiseg.errors import ConfigError
from semiseg.inference import SlidingWindow, importance_map, tile_starts
from semiseg.train import train

MEAN, STD = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]
# 40x40 images are no multiple of the U-Net's 16: only 16x16 crops and 16x16 tiles pass through it
CROPS = ["dataset.image_size=[40,40]", "data.crop_size=[16,16]", "evaluation.sliding_window=true"]


def _image_and_mask(height: int = 60, width: int = 90, defect: tuple[int, int] = (50, 80)) -> tuple:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, size=(height, width, 3), dtype=np.uint8)
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[defect] = 2
    return image, mask


def test_crops_are_taken_at_native_resolution_and_shared_by_all_views() -> None:
    image, _ = _image_and_mask()
    views = ViewMaker(
        [256, 256], MEAN, STD, 3, views=("image", "image_strong"), crop_size=[16, 24], strong=[]
    )  # no strong augmentation: a strong view is the weak view's crop itself
    sample = views(image, None)
    assert sample["image"].shape == (3, 16, 24)
    assert torch.equal(sample["image"], sample["image_strong"])
    # the crop is a piece of the image at its own resolution (not a resize of the whole image)
    crop = (sample["image"].permute(1, 2, 0).numpy() * STD[0] + MEAN[0]) * 255
    windows = np.lib.stride_tricks.sliding_window_view(image.astype(np.float32), (16, 24, 3))[:, :, 0]
    distance = np.abs(windows - crop).max(axis=(2, 3, 4))
    assert distance.min() < 1.0


def test_defect_crop_prob_centres_the_crop_on_the_defect() -> None:
    image, mask = _image_and_mask(defect=(30, 40))
    views = ViewMaker([256, 256], MEAN, STD, 3, crop_size=[16, 16], defect_crop_prob=1.0)
    for _ in range(5):
        sample = views(image, mask)
        assert sample["mask"][8, 8] == 2  # the one defect pixel sits at the crop's centre
    random_views = ViewMaker([256, 256], MEAN, STD, 3, crop_size=[16, 16], defect_crop_prob=0.0)
    hits = sum(int((random_views(image, mask)["mask"] == 2).any()) for _ in range(40))
    assert hits < 40  # random crops mostly miss a single pixel of a 60x90 image


def test_images_smaller_than_the_crop_are_padded_with_the_ignore_value() -> None:
    image, mask = _image_and_mask(height=10, width=12, defect=(2, 3))
    sample = ViewMaker([256, 256], MEAN, STD, 3, crop_size=[16, 16], ignore_index=255)(image, mask)
    assert sample["image"].shape == (3, 16, 16)
    assert int((sample["mask"] == 255).sum()) == 16 * 16 - 10 * 12


def test_scale_and_native_evaluation_views() -> None:
    image, mask = _image_and_mask(height=60, width=90)
    native = ViewMaker([256, 256], MEAN, STD, 3, native=True, scale=0.5)(image, mask)
    assert native["image"].shape == (3, 30, 45) and native["mask"].shape == (30, 45)
    with pytest.raises(ConfigError, match=r"dataset\.scale"):
        ViewMaker([256, 256], MEAN, STD, 3, native=True, scale=0.0)


class PixelNet(nn.Module):
    """A 1x1 convolution: its logits at a pixel depend on that pixel only, so tiling must not change them."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, kernel_size=1)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.conv(image)


@pytest.mark.parametrize("weighting", ["gaussian", "mean"])
@pytest.mark.parametrize("size", [(37, 53), (10, 12), (16, 16)])
def test_sliding_window_equals_the_whole_image_for_a_pixelwise_network(weighting: str, size: tuple) -> None:
    net = PixelNet()
    image = torch.randn(2, 3, *size)
    window = SlidingWindow((16, 16), overlap=0.5, weighting=weighting, batch_size=3)
    tiled = window(net, image)
    assert tiled.shape == (2, 4, *size)
    expected = net(image).log_softmax(dim=1)
    assert torch.allclose(tiled, expected, atol=1e-5)


def test_overlapping_tiles_are_averaged_with_their_weights() -> None:
    """A network whose output depends on where the tile lies: the average must weigh each tile's value."""
    calls = []

    def by_tile(tiles: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(tiles.shape[0], 2, *tiles.shape[-2:])
        for index in range(tiles.shape[0]):
            calls.append(index)
            logits[index, 1] = tiles[index, 0, 0, 0]  # the tile's first pixel value decides its class-1 logit
        return logits

    image = torch.zeros(1, 1, 8, 12)
    image[0, 0, :, 4:] = 100.0  # the second tile (x from 4) starts on a bright pixel: class 1 for sure
    window = SlidingWindow((8, 8), overlap=0.5, weighting="mean")
    assert window.positions(8, 12) == [(0, 0), (0, 4)]
    probabilities = window(by_tile, image).exp()[0, 1]
    assert torch.allclose(probabilities[:, :4], torch.full((8, 4), 0.5))  # first tile only: logits 0 -> 0.5
    assert torch.allclose(probabilities[:, 4:8], torch.full((8, 4), 0.75))  # mean of 0.5 and 1.0
    assert torch.allclose(probabilities[:, 8:], torch.ones(8, 4))


def test_tiles_cover_the_image_and_the_gaussian_weights_the_centre() -> None:
    assert tile_starts(37, 16, 8) == [0, 8, 16, 21]
    assert tile_starts(16, 16, 8) == [0]
    weights = importance_map(16, 16, "gaussian", 0.125)
    assert weights.max() == weights[7:9, 7:9].max() and weights[0, 0] < weights[8, 8]
    assert float(weights.min()) > 0


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("window_overlap", 1.0),
        ("window_weighting", "median"),
        ("window_size", None),
        ("window_size", [20, 20]),
        ("window_batch_size", 0),
    ],
)
def test_bad_window_settings_are_refused(key: str, value: object) -> None:
    settings = {"sliding_window": True, "window_size": [16, 16], key: value}
    with pytest.raises(ConfigError, match=rf"evaluation\.{key}"):
        SlidingWindow.from_config(settings, size_divisor=16)


# ---- every method that trains step by step, with crops and the sliding window -------------------------
def _per_step_methods() -> list[str]:
    """Every method config but the generation loops (``method.driver``) and cps_rg (refused below)."""
    from conftest import compose_config

    names = []
    for path in sorted((Path(CONFIG_DIR) / "method").glob("*.yaml")):
        method = compose_config([f"method={path.stem}"]).method
        if not method.get("driver") and method.name != "cps_rg":
            names.append(path.stem)
    return names


PER_STEP = _per_step_methods()


def test_the_per_step_list_holds_the_methods() -> None:
    assert {"supervised", "uaps", "mean_teacher", "cps", "cct", "dct", "fixmatch", "unimatch", "u2pl"} <= set(PER_STEP)


@pytest.mark.parametrize("method", PER_STEP)
def test_every_per_step_method_trains_and_tests_on_crops_with_the_sliding_window(method: str, make_cfg) -> None:
    cfg = make_cfg(f"method={method}", *CROPS, "data.defect_crop_prob=0.5", "trainer.fast_dev_run=true")
    results = train(cfg)
    assert results["steps"] >= 1
    assert 0.0 <= results["metrics"]["test/pixel_acc"] <= 1.0


def test_evaluation_runs_at_each_images_own_size(make_cfg, fake_data_dir: Path) -> None:
    from hydra.utils import get_class

    from semiseg.runner import build_datamodule, build_module

    cfg = make_cfg("dataset=mtiles", f"paths.data_dir={fake_data_dir}", "data.crop_size=[32,32]", *CROPS[2:])
    datamodule = build_datamodule(cfg, get_class(cfg.method._target_))
    shapes = {tuple(batch["image"].shape) for batch in datamodule.test_dataloader()}
    assert all(shape[0] == 1 for shape in shapes) and len(shapes) > 1  # one image per batch, native sizes
    module = build_module(cfg).eval()
    batch = next(iter(datamodule.test_dataloader()))
    with torch.no_grad():
        logits = module.segment(batch["image"])
    assert logits.shape[-2:] == batch["mask"].shape[-2:]
    labeled = next(iter(datamodule.train_dataloader()))[0]["labeled"]
    assert labeled["image"].shape[-2:] == (32, 32)


def test_crops_without_the_sliding_window_are_refused(make_cfg, capsys) -> None:
    with pytest.raises(SystemExit) as stop:
        train(make_cfg("data.crop_size=[16,16]"))
    assert stop.value.code == 2
    assert "evaluation.sliding_window=true" in capsys.readouterr().err


def test_label_growing_methods_refuse_crops(make_cfg, capsys) -> None:
    with pytest.raises(SystemExit) as stop:
        train(make_cfg("method=cps_rg", *CROPS, "trainer.fast_dev_run=true"))
    assert stop.value.code == 2
    assert "data.crop_size" in capsys.readouterr().err


def test_fit_check_scores_the_checkpoint_on_its_own_training_crops(make_cfg, monkeypatch) -> None:
    """experiments/native_resolution/fit_check.py: the confusion counts every labeled crop pixel and its
    columns are the checkpoint's predictions (a network forced to say class 2 puts every pixel there)."""
    import importlib.util

    script = Path(__file__).resolve().parents[1] / "experiments" / "native_resolution" / "fit_check.py"
    spec = importlib.util.spec_from_file_location("fit_check", script)
    fit_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fit_check)
    cfg = make_cfg(*CROPS)
    train(cfg)
    run_dir = Path(cfg.paths.output_dir)
    report = fit_check.fit_check(run_dir, "last.ckpt", num_batches=2, seed=0)
    confusion = torch.tensor(report["confusion"])
    num_classes = len(cfg.dataset.class_names)
    assert confusion.shape == (num_classes, num_classes)
    pixels = 2 * cfg.data.batch_size_labeled * 16 * 16
    assert int(confusion.sum()) == pixels  # synthetic images are larger than the crop: nothing is padded
    assert len(report["iou_on_training_batches"]) == num_classes

    class SaysTwo(nn.Module):
        def forward(self, image: torch.Tensor) -> torch.Tensor:
            logits = torch.zeros(image.shape[0], num_classes, *image.shape[-2:])
            logits[:, 2] = 1.0
            return logits

    monkeypatch.setattr(fit_check, "load_module", lambda *args: SaysTwo())
    forced_report = fit_check.fit_check(run_dir, "last.ckpt", num_batches=2, seed=0)
    forced = torch.tensor(forced_report["confusion"])
    assert int(forced[:, 2].sum()) == pixels and int(forced.sum()) == pixels
    true_share_of_two = float(forced[2].sum()) / pixels  # IoU of the class every pixel is called: its true share
    assert forced_report["iou_on_training_batches"][2] == pytest.approx(true_share_of_two, abs=1e-4)
    assert all(iou in (0.0, None) for index, iou in enumerate(forced_report["iou_on_training_batches"]) if index != 2)
    assert forced_report["predicted_defect_share"] == 1.0
