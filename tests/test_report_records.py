"""Run records and learning curves in the report: a sweep kept as a records file (no run directories) reports
exactly as its run directories do, a run found twice counts once, the validation curves are hand-computed means."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from semiseg.report import ReportError, make_report, save_records
from test_report import PNG_MAGIC, write_run
from test_report_paired import write_per_image


def write_curve(run_dir: Path, points: dict[int, float], diag: dict[int, float] | None = None) -> None:
    """A Lightning CSV log: validation rows at ``step - 1`` (as Lightning writes them), and a training row."""
    (run_dir / "csv").mkdir()
    lines = ["epoch,step,train/loss,val/mIoU,diag/pseudo_label_mIoU"]
    lines.append("0,4,0.9,,")
    for step, value in points.items():
        lines.append(f"0,{step - 1},,{value},{'' if diag is None else diag[step]}")
    (run_dir / "csv" / "metrics.csv").write_text("\n".join(lines) + "\n")


def best_val(run_dir: Path) -> None:
    results = json.loads((run_dir / "results.json").read_text())
    results["best_val"] = {"metric": "val/mIoU", "value": 0.5, "step": 20}
    results["metrics"]["test/mIoU_image"] = results["metrics"]["test/mIoU"] - 0.01
    (run_dir / "results.json").write_text(json.dumps(results))


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    root = tmp_path / "sweep"
    for seed, (miou, curve) in enumerate([(0.30, {10: 0.2, 20: 0.3}), (0.34, {10: 0.4, 20: 0.5})]):
        run_dir = write_run(root, "supervised", 0.1, seed, miou)
        write_per_image(run_dir, {"x": 0.5, "y": 0.6})
        write_curve(run_dir, curve)
        best_val(run_dir)
    for seed, (miou, curve) in enumerate([(0.40, {10: 0.3, 20: 0.6}), (0.45, {10: 0.5, 20: 0.6})]):
        run_dir = write_run(root, "uaps", 0.1, seed, miou)
        write_per_image(run_dir, {"x": 0.7, "y": 0.6})
        write_curve(run_dir, curve, diag={10: 0.1, 20: 0.3})
        best_val(run_dir)
    return root


def read(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_curves_are_means_over_seeds_at_each_step(sweep: Path, tmp_path: Path) -> None:
    report = make_report([sweep], out=tmp_path / "out")
    rows = {(r["row"], r["key"], r["step"]): r for r in read(tmp_path / "out" / "curves.csv")}
    supervised = rows[("supervised", "val/mIoU", "10")]  # Lightning's index 9 is the 10th step
    assert float(supervised["mean"]) == pytest.approx(0.3) and int(supervised["n"]) == 2
    assert float(supervised["std"]) == pytest.approx(0.1414213562)
    assert float(rows[("uaps", "val/mIoU", "20")]["std"]) == 0.0
    assert float(rows[("uaps", "diag/pseudo_label_mIoU", "20")]["mean"]) == pytest.approx(0.3)
    assert ("supervised", "diag/pseudo_label_mIoU", "10") not in rows  # supervised logs no diagnostic
    assert not any(key == "train/loss" for _, key, _ in rows)
    names = sorted(p.name for p in report["plots"] if p.name.startswith("curve_"))
    assert names == ["curve_diag_pseudo_label_mIoU_synthetic_r0.1_100steps.png",
                     "curve_val_mIoU_synthetic_r0.1_100steps.png"]  # fmt: skip
    assert all((tmp_path / "out" / n).read_bytes().startswith(PNG_MAGIC) for n in names)
    runs = read(tmp_path / "out" / "runs.csv")
    assert [(r["method"], r["seed"], r["test/mIoU"]) for r in runs][:2] == [("supervised", "0", "0.3"),
                                                                           ("supervised", "1", "0.34")]  # fmt: skip
    assert "test/mIoU_image" in runs[0] and runs[0]["train_seconds"] == "1.0" and runs[0]["best_val_step"] == "20"


def test_records_report_exactly_as_the_run_directories(sweep: Path, tmp_path: Path) -> None:
    from_dirs = make_report([sweep], out=tmp_path / "dirs")
    records = tmp_path / "kept" / "runs.jsonl"
    records.parent.mkdir()
    save_records(from_dirs["runs"], records)
    moved = tmp_path / "gone"
    sweep.rename(moved)  # the run directories are no longer where the records say they were
    from_records = make_report([records], out=tmp_path / "records")
    for name in ("paired.csv", "table.csv", "cells.csv", "curves.csv"):
        assert (tmp_path / "records" / name).read_text() == (tmp_path / "dirs" / name).read_text(), name
    paired = read(tmp_path / "records" / "paired.csv")
    assert paired[0]["boot_delta"] != ""  # the per-image scores travelled with the records
    assert len(from_records["plots"]) == len(from_dirs["plots"])
    # a folder holding runs.jsonl is read too
    assert len(make_report([records.parent], out=tmp_path / "again")["runs"]) == 4


def test_a_run_found_twice_counts_once_and_the_later_wins(sweep: Path, tmp_path: Path) -> None:
    records = tmp_path / "runs.jsonl"
    save_records(make_report([sweep], out=tmp_path / "first")["runs"], records)
    rerun = write_run(tmp_path / "rerun", "uaps", 0.1, 1, 0.55)  # the same run as uaps seed 1, newer figures
    report = make_report([records, rerun], out=tmp_path / "out")
    cell = report["table"].cells[("uaps", "synthetic", 0.1)]
    assert cell.n == 2 and cell.mean == pytest.approx((0.40 + 0.55) / 2)
    report = make_report([rerun, records], out=tmp_path / "out2")
    assert report["table"].cells[("uaps", "synthetic", 0.1)].mean == pytest.approx((0.40 + 0.45) / 2)


def test_bad_records_and_options_are_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "runs.jsonl"
    bad.write_text('{"results": {"method": "x"}}\n')
    with pytest.raises(ReportError, match=r"runs.jsonl, line 1: not a semiseg run record"):
        make_report([bad], out=tmp_path / "out")
    write_run(tmp_path / "ok", "cps", 0.1, 0, 0.2)
    done = subprocess.run(
        [sys.executable, "-m", "semiseg.report", str(tmp_path / "ok"), "--save-records", str(tmp_path / "r.json")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2 and "ending in .jsonl" in done.stderr and "Traceback" not in done.stderr
    done = subprocess.run(
        [sys.executable, "-m", "semiseg.report", str(tmp_path / "ok"), "--out", str(tmp_path / "rep"),
         "--save-records", str(tmp_path / "r.jsonl")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    record = json.loads((tmp_path / "r.jsonl").read_text())
    assert record["results"]["method"] == "cps" and record["max_steps"] == 100
