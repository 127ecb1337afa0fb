"""``experiment=active_learning``: a tiny simulation on fake data, both strategies, two rounds."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from semiseg import active_learning
from semiseg.active_learning import ActiveLearningSettings, reveal
from semiseg.data.split import Split
from semiseg.errors import ConfigError
from semiseg.train import train


def test_reveal_moves_ids_and_keeps_the_held_out_parts() -> None:
    split = Split(labeled=["a"], unlabeled=["b", "c", "d"], val=["v"], test=["t"])
    revealed = reveal(split, ["c"])
    assert revealed.labeled == ["a", "c"] and revealed.unlabeled == ["b", "d"]
    assert revealed.val == ["v"] and revealed.test == ["t"] and revealed.meta["revealed"] == ["c"]


@pytest.mark.parametrize(("key", "value"), [("rounds", 0), ("k", -1), ("strategies", ["oracle"])])
def test_bad_settings_are_refused(key: str, value: object) -> None:
    with pytest.raises(ConfigError, match=rf"active_learning\.{key}"):
        ActiveLearningSettings.from_config({key: value})


def test_a_two_round_simulation_picks_reveals_and_retrains(make_cfg, tmp_path: Path) -> None:
    cfg = make_cfg(
        "experiment=active_learning", "labeled_ratio=0.1", "active_learning.rounds=2", "active_learning.k=2",
        "active_learning.suggest.score=entropy", "logger=none",
    )  # fmt: skip
    summary = train(cfg)
    run = Path(cfg.paths.output_dir)
    curves = summary["curves"]
    assert set(curves) == {"suggest", "random"}
    start = json.loads((run / "round_0" / "revealed_split.json").read_text())
    for strategy, points in curves.items():
        assert [p["round"] for p in points] == [0, 1]
        assert points[1]["labeled"] == points[0]["labeled"] + 2
        picked = points[1]["picked"]
        assert len(picked) == 2 and set(picked) <= set(start["unlabeled"])
        split = json.loads((run / strategy / "round_1" / "split.json").read_text())
        assert set(picked) <= set(split["labeled"]) and not set(picked) & set(split["unlabeled"])
        assert split["test"] == start["test"] and split["val"] == start["val"]
        assert (run / strategy / "round_1" / "results.json").is_file()
    # the suggest strategy took the round-0 model's most uncertain images
    from semiseg.active_learning import ActiveLearningRun

    simulation = ActiveLearningRun(cfg)
    assert simulation.pick("suggest", run / "round_0", start["unlabeled"], 1) == curves["suggest"][1]["picked"]
    with open(run / "active_learning.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["strategy"], r["round"]) for r in rows] == [
        ("suggest", "0"),
        ("suggest", "1"),
        ("random", "0"),
        ("random", "1"),
    ]
    assert (run / "active_learning.png").stat().st_size > 0
    # run again in the same folder: every round is reused, nothing retrains
    (run / "round_0" / "weights.pt").unlink()
    again = train(cfg)
    assert again["curves"] == summary["curves"]


def fake_summary(seed: int, suggest: list[float], random: list[float]) -> dict:
    def points(values: list[float]) -> list[dict]:
        return [{"round": r, "labeled": 10 + 5 * r, "test/mIoU": v} for r, v in enumerate(values)]

    return {"method": "supervised", "dataset": "neu", "k": 5, "seed": seed,
            "curves": {"suggest": points(suggest), "random": points(random)}}  # fmt: skip


def test_curves_over_seeds_by_hand(tmp_path: Path) -> None:
    for seed, suggest, random in ((0, [0.2, 0.5], [0.2, 0.4]), (1, [0.4, 0.6], [0.4, 0.3])):
        folder = tmp_path / "sweep" / str(seed)
        folder.mkdir(parents=True)
        (folder / "active_learning.json").write_text(json.dumps(fake_summary(seed, suggest, random)))
    rows = active_learning.write_summary([tmp_path / "sweep"], tmp_path / "out")
    by_key = {(r["strategy"], r["round"]): r for r in rows}
    last = by_key[("suggest", 1)]
    assert last["labeled"] == 15 and last["test_mIoU_mean"] == 0.55 and last["seeds"] == "0 1"
    assert last["test_mIoU_std"] == pytest.approx(0.0707, abs=1e-4)  # sample std of 0.5 and 0.6
    assert last["delta_vs_random"] == 0.2 and last["delta_vs_random_per_seed"] == "+0.1000 +0.3000"
    assert by_key[("random", 1)]["delta_vs_random"] is None
    assert (tmp_path / "out" / "curve.csv").is_file() and (tmp_path / "out" / "curve_supervised_neu.png").is_file()
    assert active_learning.main([str(tmp_path / "empty"), "--out", str(tmp_path / "o2")]) == 2
