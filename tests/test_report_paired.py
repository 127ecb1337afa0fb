"""The report's paired statistics against supervised, on hand-computed cases: seed-paired differences with their
t interval and exact sign-flip p-value, the paired bootstrap over test images, paired.csv and the tables."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest

from semiseg.report import (
    PAIRED_COLUMNS,
    make_report,
    paired_bootstrap,
    sign_flip_floor,
    sign_flip_p_value,
    t_interval,
)
from test_report import write_run

T_975_DF2 = 4.302652729911275  # Student's t, 97.5 % quantile, 2 degrees of freedom (tables)
T_975_DF4 = 2.7764451051977987


def write_per_image(run_dir: Path, scores: dict[str, float | None]) -> None:
    lines = ["id,IoU/background,IoU/a,mIoU_image,mDice_image"]
    lines += [f"{i},0.9,{'' if v is None else v},{'' if v is None else v},{'' if v is None else v}"
              for i, v in scores.items()]  # fmt: skip
    (run_dir / "per_image.csv").write_text("\n".join(lines) + "\n")


def test_sign_flip_p_value_by_enumeration() -> None:
    # d = (0.01, 0.044, -0.016): the 8 sign patterns give sums ±0.07, ±0.05, ±0.038, ±0.018;
    # |sum| >= |0.038| for 6 of them -> p = 6/8
    assert sign_flip_p_value([0.01, 0.044, -0.016]) == pytest.approx(0.75)
    # all of one sign: only the observed pattern and its mirror are as extreme -> the floor 2/2^n
    assert sign_flip_p_value([1, 2, 3]) == pytest.approx(2 / 8) == sign_flip_floor(3)
    assert sign_flip_p_value([0.5, 0.1, 0.2, 0.3, 0.4]) == pytest.approx(0.0625) == sign_flip_floor(5)
    assert sign_flip_p_value([0.2]) == 1.0 == sign_flip_floor(1)  # one pair: d and -d
    # d = (1, 1, -1, 3), observed sum 4: with +3 the three ±1 sum to -3, -1, 1, 3 (1, 3, 3, 1 patterns), totals
    # 0, 2, 4, 6 -> 4 patterns reach |4|; with -3 the mirror image, 4 more -> p = 8/16
    assert sign_flip_p_value([1, 1, -1, 3]) == pytest.approx(8 / 16)


def test_t_interval_from_the_tables() -> None:
    low, high = t_interval([1.0, 2.0, 3.0])  # mean 2, sd 1
    assert low == pytest.approx(2 - T_975_DF2 / math.sqrt(3)) and high == pytest.approx(2 + T_975_DF2 / math.sqrt(3))
    low, high = t_interval([0.1, 0.2, 0.3, 0.4, 0.5])  # mean 0.3, sd sqrt(0.025)
    assert high - 0.3 == pytest.approx(T_975_DF4 * math.sqrt(0.025) / math.sqrt(5))
    assert t_interval([0.3]) == (None, None)


def test_paired_bootstrap_pairs_images_by_id_and_pools_seeds() -> None:
    # seed 0: deltas a +0.1, b +0.3; seed 1: a -0.1, b +0.1 (rows in another order) -> per image 0 and 0.2
    seed0 = ({"a": 0.6, "b": 0.8, "only_here": 0.9}, {"a": 0.5, "b": 0.5})
    seed1 = ({"b": 0.6, "a": 0.4}, {"a": 0.5, "b": 0.5})
    mean, low, high = paired_bootstrap([seed0, seed1])
    assert mean == pytest.approx(0.1)
    # two images: a resample's mean is 0, 0.1 or 0.2 (chances 1/4, 1/2, 1/4): the 95 % percentile interval is [0, 0.2]
    assert low == pytest.approx(0.0) and high == pytest.approx(0.2)
    # the same difference on every image: the interval has no width
    assert paired_bootstrap([({"a": 0.7, "b": 0.4}, {"a": 0.6, "b": 0.3})]) == pytest.approx((0.1, 0.1, 0.1))


def test_report_writes_paired_csv_and_bolds_only_intervals_excluding_zero(tmp_path: Path) -> None:
    root = tmp_path / "sweep"
    supervised = [0.30, 0.34, 0.29]
    for seed, miou in enumerate(supervised):
        write_per_image(write_run(root, "supervised", 0.1, seed, miou), {"x": 0.5, "y": 0.6, "z": None})
    # uaps: +0.10, +0.11, +0.12 (mean 0.11, sd 0.01: the t interval excludes 0); per image +0.1 on x and y
    for seed, miou in enumerate([0.40, 0.45, 0.41]):
        write_per_image(write_run(root, "uaps", 0.1, seed, miou), {"y": 0.7, "x": 0.6, "z": None})
    # cps: +0.01, +0.044, -0.016 (the interval covers 0); seed 7 has no supervised partner
    for seed, miou in [(0, 0.31), (1, 0.384), (2, 0.274), (7, 0.9)]:
        write_run(root, "cps", 0.1, seed, miou)
    # a supervised run of another budget is another protocol: never paired with the runs above
    write_run(tmp_path / "other", "fixmatch", 0.1, 0, 0.5, max_steps=999)
    write_run(tmp_path / "other", "supervised", 0.1, 1, 0.1, max_steps=999, dataset="neu")

    report = make_report([root, tmp_path / "other"], out=tmp_path / "out")
    with (tmp_path / "out" / "paired.csv").open() as handle:
        reader = csv.DictReader(handle)
        assert tuple(reader.fieldnames or ()) == PAIRED_COLUMNS
        rows = {row["method"]: row for row in reader}
    assert set(rows) == {"uaps", "cps"}  # fixmatch has no supervised run of its protocol
    uaps, cps = rows["uaps"], rows["cps"]
    assert uaps["baseline"] == "supervised" and uaps["dataset"] == "synthetic" and float(uaps["labeled_ratio"]) == 0.1
    assert int(uaps["n_pairs"]) == 3 and float(uaps["mean_delta"]) == pytest.approx(0.11)
    half = T_975_DF2 * 0.01 / math.sqrt(3)
    assert float(uaps["ci_low"]) == pytest.approx(0.11 - half) and float(uaps["ci_high"]) == pytest.approx(0.11 + half)
    assert float(uaps["p_value"]) == pytest.approx(0.25)
    assert float(uaps["boot_delta"]) == pytest.approx(0.1)
    assert float(uaps["boot_ci_low"]) == pytest.approx(0.1) and float(uaps["boot_ci_high"]) == pytest.approx(0.1)
    assert int(cps["n_pairs"]) == 3 and float(cps["mean_delta"]) == pytest.approx(0.038 / 3)
    assert float(cps["p_value"]) == pytest.approx(0.75)
    assert float(cps["ci_low"]) < 0 < float(cps["ci_high"])
    assert cps["boot_delta"] == "" and cps["boot_ci_low"] == ""  # no per_image.csv: no bootstrap

    markdown = (tmp_path / "out" / "table.md").read_text()
    assert "| synthetic | 0.1 | uaps | 3 | **+0.1100** |" in markdown
    assert "| synthetic | 0.1 | cps | 3 | +0.0127 |" in markdown
    assert "0.7500 (floor 0.2500)" in markdown and "Bold: the 95 % t interval" in markdown
    page = (tmp_path / "out" / "index.html").read_text()
    assert "Paired differences against supervised" in page and "<b>+0.1100</b>" in page and "<b>+0.0127" not in page
    assert [c.method for c in report["paired"]] == ["cps", "uaps"]
