"""``experiment=active_learning``: a tiny simulation on fake data, both strategies, two rounds."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

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
