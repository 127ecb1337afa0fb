"""The comparison report on a fixture of results.json files: values equal hand-computed means and standard
deviations, the best is marked, plots are real PNGs, mixed protocols are refused."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from semiseg.report import ReportError, make_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SPLIT = {"labeled": 5, "unlabeled": 45, "val": 6, "test": 14}


def write_run(root: Path, method: str, ratio: float, seed: int, miou: float, *, dataset: str = "synthetic",
              extra: tuple[str, ...] = (), max_steps: int = 100, split: dict | None = None) -> Path:  # fmt: skip
    overrides = [f"method={method}", f"labeled_ratio={ratio}", f"seed={seed}", *extra]
    run_dir = root / ",".join(sorted(overrides)).replace("/", "-")
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"trainer": {"max_steps": max_steps}}))
    results = {
        "method": method, "dataset": dataset, "model": "unet", "labeled_ratio": ratio, "seed": seed,
        "split_seed": 0, "num_params": 1, "num_params_train": 1, "split": split or SPLIT,
        "metrics": {"test/mIoU": miou, "test/mDice": miou + 0.1}, "best_val": {}, "steps": max_steps,
        "train_seconds": 1.0, "checkpoint": None, "config": "config.yaml",
    }  # fmt: skip
    (run_dir / "results.json").write_text(json.dumps(results))
    return run_dir


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    root = tmp_path / "sweep"
    values = {
        ("supervised", 0.1): [0.30, 0.34, 0.29],
        ("supervised", 0.3): [0.50, 0.52],
        ("cps", 0.1): [0.40, 0.36, 0.41],
        ("cps", 0.3): [0.48],
    }
    for (method, ratio), mious in values.items():
        for seed, miou in enumerate(mious):
            write_run(root, method, ratio, seed, miou)
    # an ablation over decoder counts (its own rows, and its own plot)
    for decoders, mious in {1: [0.35, 0.37], 2: [0.42, 0.44], 3: [0.45, 0.41]}.items():
        for seed, miou in enumerate(mious):
            write_run(root, "uaps", 0.1, seed, miou, extra=(f"method.num_aux_decoders={decoders}",))
    return root


def read_cells(out: Path) -> dict[tuple[str, str], dict[str, str]]:
    with (out / "cells.csv").open() as handle:
        return {(row["method"], row["labeled_ratio"]): row for row in csv.DictReader(handle)}


def test_table_values_are_hand_computed_means_and_stds(sweep: Path) -> None:
    report = make_report([sweep])
    out = report["out"]
    assert out == sweep / "report"
    cells = read_cells(out)
    # supervised r=0.1: mean (0.30+0.34+0.29)/3 = 0.31; sample std sqrt(((-.01)^2+.03^2+(-.02)^2)/2) = sqrt(0.0007)
    assert float(cells[("supervised", "0.1")]["mean"]) == pytest.approx(0.31)
    assert float(cells[("supervised", "0.1")]["std"]) == pytest.approx(0.0007**0.5)
    assert cells[("supervised", "0.1")]["n"] == "3"
    # cps r=0.1: mean 0.39, deviations .01 -.03 .02 -> sqrt(0.0014/2)
    assert float(cells[("cps", "0.1")]["mean"]) == pytest.approx(0.39)
    assert float(cells[("cps", "0.1")]["std"]) == pytest.approx(0.0007**0.5)
    # supervised r=0.3: 0.51 ± sqrt(0.0002); cps r=0.3: one seed, no std
    assert float(cells[("supervised", "0.3")]["std"]) == pytest.approx(0.0002**0.5)
    assert cells[("cps", "0.3")]["std"] == "" and cells[("cps", "0.3")]["n"] == "1"
    # best per column: uaps with 3 decoders (0.43) at r=0.1, supervised (0.51) at r=0.3
    best = {key: row["best"] == "True" for key, row in cells.items()}
    assert best[("uaps (method.num_aux_decoders=3)", "0.1")] and not best[("cps", "0.1")]
    assert best[("supervised", "0.3")] and not best[("cps", "0.3")]

    markdown = (out / "table.md").read_text()
    assert "| supervised | 0.3100 ± 0.0265 (3) | **0.5100 ± 0.0141 (2)** |" in markdown
    assert "| cps | 0.3900 ± 0.0265 (3) | 0.4800 ± n/a (1) |" in markdown
    with (out / "table.csv").open() as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["method", "synthetic r=0.1", "synthetic r=0.3"]
    assert ["supervised", "0.3100 ± 0.0265 (3)", "*0.5100 ± 0.0141 (2)"] in rows


def test_plots_are_real_pngs_and_the_page_shows_them(sweep: Path, tmp_path: Path) -> None:
    out = tmp_path / "elsewhere"
    report = make_report([sweep], out=out)
    names = sorted(p.name for p in report["plots"])
    assert names == ["ablation_method.num_aux_decoders.png", "ratio_synthetic.png"]
    for path in report["plots"]:
        data = path.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000
    page = (out / "index.html").read_text()
    for name in names:
        assert f'src="{name}"' in page
    assert "<b>0.5100 ± 0.0141 (2)</b>" in page


def test_several_folders_are_combined(tmp_path: Path) -> None:
    write_run(tmp_path / "a", "cps", 0.1, 0, 0.2)
    write_run(tmp_path / "b", "cps", 0.1, 1, 0.4)
    report = make_report([tmp_path / "a", tmp_path / "b"], out=tmp_path / "out")
    cell = report["table"].cells[("cps", "synthetic", 0.1)]
    assert cell.n == 2 and cell.mean == pytest.approx(0.3)


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [({"max_steps": 200}, "budget=200 steps"), ({"split": {**SPLIT, "labeled": 9}}, "labeled=9")],
)
def test_refuses_to_average_different_protocols(sweep: Path, tmp_path: Path, kwargs: dict, named: str) -> None:
    other = tmp_path / "other"
    write_run(other, "cps", 0.1, 5, 0.9, **kwargs)
    with pytest.raises(ReportError, match="refusing to average runs of different protocols") as error:
        make_report([sweep, other], out=tmp_path / "out")
    assert named in str(error.value) and "budget=100 steps" in str(error.value)


def test_command_line_errors_are_one_message(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "semiseg.report", str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2 and "no results.json under" in done.stderr and "Traceback" not in done.stderr
