"""``python -m semiseg.suggest``: uncertainty scores, diversity, suggestions.csv and suggestions.png."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import open_dict

import semiseg.suggest as suggest_app
from semiseg.config import CONFIG_DIR
from semiseg.errors import ConfigError
from semiseg.runner import build_module
from semiseg.suggest import Scored, SuggestSettings, entropy_map, margin_map, method_members, reduce_map, select
from semiseg.train import train

CROPS = ["dataset.image_size=[40,40]", "data.crop_size=[16,16]", "evaluation.sliding_window=true"]


def suggest(*overrides: str, output_dir: Path) -> dict:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="suggest", overrides=list(overrides))
    with open_dict(cfg):
        cfg.output_dir = str(output_dir)
    return suggest_app.suggest(cfg)


def read_rows(path: Path) -> list[dict]:
    with open(path) as handle:
        return list(csv.DictReader(handle))


def test_entropy_and_margin_on_known_probabilities() -> None:
    probabilities = torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0], [0.6, 0.3, 0.1]]).T.reshape(1, 3, 1, 3)
    assert torch.allclose(entropy_map(probabilities)[0, 0], torch.tensor([math.log(2), 0.0, 0.8979457]), atol=1e-5)
    assert torch.allclose(margin_map(probabilities)[0, 0], torch.tensor([1.0, 0.0, 0.7]), atol=1e-6)
    values = torch.arange(100, dtype=torch.float32)
    assert reduce_map(values, SuggestSettings(reduce="top", top_share=0.02)) == pytest.approx(98.5)
    assert reduce_map(values, SuggestSettings(reduce="mean")) == pytest.approx(49.5)


def _scored(image_id: str, score: float, features: list[float]) -> Scored:
    vector = np.asarray(features, dtype=np.float32)
    return Scored(image_id, score, {}, np.zeros((2, 2)), vector / np.linalg.norm(vector), np.zeros((2, 2, 3)))


def test_diversity_skips_near_duplicates() -> None:
    items = [
        _scored("a", 0.9, [1, 0]),
        _scored("a_copy", 0.89, [1, 0.01]),
        _scored("b", 0.5, [0, 1]),
        _scored("c", 0.1, [1, 1]),
    ]
    plain = select(items, 2, SuggestSettings())
    assert [item.id for item in plain[:2]] == ["a", "a_copy"]
    diverse = select(items, 2, SuggestSettings(diversity=True, pool_factor=2))
    assert [item.id for item in diverse[:2]] == ["a", "b"]
    assert sorted(item.rank for item in diverse) == [1, 2, 3, 4]


@pytest.mark.parametrize(
    ("method", "measure"),
    [
        ("uaps", "decoders"),
        ("cct", "decoders"),
        ("mean_teacher", "teacher_student"),
        ("cps", "two_networks"),
        ("ucc", "two_heads"),
        ("supervised", "mc_dropout"),
    ],
)
def test_each_method_has_its_own_uncertainty(method: str, measure: str, make_cfg) -> None:
    module = build_module(make_cfg(f"method={method}")).eval()
    members = method_members(module, mc_samples=3)
    assert members.name == measure
    image = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        outputs = members.all(image)
        assert len(outputs) == members.count
        assert all(out.shape == (1, 5, 32, 32) for out in outputs)
        assert torch.allclose(members.one(image, members.count - 1), outputs[-1]) or measure == "mc_dropout"
    if measure == "mc_dropout":
        assert not torch.equal(outputs[0], outputs[1])  # dropout was active
        assert all(not m.training for m in module.modules())  # and is off again


def test_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match=r"suggest\.score"):
        SuggestSettings.from_config({"score": "variance"})


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from conftest import compose_config

    checkpoints = {}
    for name, overrides in {"supervised": [], "uaps_crops": ["method=uaps", *CROPS]}.items():
        run_dir = tmp_path_factory.mktemp(name)
        train(compose_config(["trainer.max_steps=2", *overrides], run_dir))
        checkpoints[name] = run_dir / "checkpoints" / "last.ckpt"
    return checkpoints


def test_suggest_ranks_the_unlabeled_split(runs: dict[str, Path], tmp_path: Path) -> None:
    summary = suggest(f"ckpt={runs['supervised']}", "k=3", "suggest.score=entropy", output_dir=tmp_path)
    import json

    split = json.loads((runs["supervised"].parent.parent / "split.json").read_text())
    unlabeled = set(split["unlabeled"] if "unlabeled" in split else split["parts"]["unlabeled"])
    rows = read_rows(tmp_path / "suggestions.csv")
    assert {row["id"] for row in rows} == unlabeled and summary["num_images"] == len(unlabeled)
    assert list(rows[0])[:3] == ["id", "score", "rank"] and {"entropy", "margin", "defect_share"} <= set(rows[0])
    assert [int(row["rank"]) for row in rows] == list(range(1, len(rows) + 1))
    scores = [float(row["entropy"]) for row in rows]
    assert scores == sorted(scores, reverse=True)  # ranked by entropy without diversity
    assert [row["id"] for row in rows[:3]] == summary["top"]
    sheet = cv2.imread(str(tmp_path / "suggestions.png"))
    assert sheet is not None and sheet.shape[0] >= suggest_app.THUMBNAIL_HEIGHT


def test_suggest_with_the_method_score_on_crops_and_a_folder(runs: dict[str, Path], tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for stem, (height, width) in {"a": (40, 56), "b": (23, 70), "c": (48, 48)}.items():
        cv2.imwrite(str(images / f"{stem}.png"), rng.integers(0, 255, (height, width, 3), dtype=np.uint8))
    summary = suggest(
        f"ckpt={runs['uaps_crops']}",
        "k=2",
        f"input_dir={images}",
        "suggest.diversity=true",
        output_dir=tmp_path / "out",
    )
    rows = read_rows(tmp_path / "out" / "suggestions.csv")
    assert summary["num_images"] == 3 and len(summary["top"]) == 2
    assert {row["method_measure"] for row in rows} == {"decoders"}
    assert all(float(row["method"]) >= 0 and float(row["score"]) == pytest.approx(float(row["method"])) for row in rows)


def test_member_disagreement_is_the_mean_kl_by_hand() -> None:
    """Two members, one pixel: p1 = (0.9, 0.1), p2 = (0.5, 0.5), p̄ = (0.7, 0.3); the score is the mean of
    KL(p̄ ‖ p1) and KL(p̄ ‖ p2) (it once received probabilities where log-probabilities belong)."""
    first = torch.tensor([0.9, 0.1]).log().view(1, 2, 1, 1)
    second = torch.tensor([0.5, 0.5]).log().view(1, 2, 1, 1)
    members = suggest_app.Members("pair", 2, lambda x: [first, second], lambda x, k: [first, second][k])
    score = suggest_app.member_disagreement(members, torch.zeros(1, 1, 1, 1), None)
    kl_first = 0.7 * math.log(0.7 / 0.9) + 0.3 * math.log(0.3 / 0.1)
    kl_second = 0.7 * math.log(0.7 / 0.5) + 0.3 * math.log(0.3 / 0.5)
    assert float(score) == pytest.approx((kl_first + kl_second) / 2, rel=1e-5)
