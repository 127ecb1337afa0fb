"""The evidence sweep script end to end on fake NEU-Seg: a run lands in the committed records and the report,
a second sitting skips it, and the README tables are written from that report alone."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SWEEP = ROOT / "experiments" / "evidence" / "sweep.sh"
TABLES = ROOT / "experiments" / "evidence" / "tables.py"


def run_sweep(fake_data_dir: Path, runs_dir: Path, evidence_dir: Path, methods: str) -> str:
    env = {
        **os.environ,
        "SEMISEG_DATA_DIR": str(fake_data_dir),
        "PYTHON": sys.executable,
        "EVIDENCE_DIR": str(evidence_dir),
        "THREADS": "1",
        "METHODS_A": methods,
        "SEEDS_A": "0",
        "METHODS_B": "",  # set but empty: no second list
        "OVERRIDES": "trainer.max_steps=1 trainer.val_check_interval=1 callbacks.pseudo_label_quality.num_images=2",
    }
    done = subprocess.run(
        ["bash", str(SWEEP), str(runs_dir)], env=env, capture_output=True, text=True, timeout=600, check=False
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return done.stdout


@pytest.mark.skipif(sys.platform == "win32", reason="bash script")
def test_sweep_records_reports_and_skips_what_it_has(
    fake_data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    evidence = tmp_path / "evidence"
    evidence.mkdir()
    out = run_sweep(fake_data_dir, tmp_path / "runs", evidence, "supervised uaps")
    assert "start supervised_s0" in out and "done uaps_s0" in out
    records = [json.loads(line) for line in (evidence / "runs.jsonl").read_text().splitlines() if line.strip()]
    assert sorted(r["results"]["method"] for r in records) == ["supervised", "uaps"]
    assert all(r["overrides"]["num_threads"] == "1" and r["max_steps"] == 1 for r in records)
    with (evidence / "report" / "paired.csv").open() as handle:
        paired = list(csv.DictReader(handle))
    assert [(row["method"], row["baseline"], row["n_pairs"]) for row in paired] == [("uaps", "supervised", "1")]
    again = run_sweep(fake_data_dir, tmp_path / "runs", evidence, "supervised")
    assert "already: supervised_s0" in again and "start" not in again  # the second sitting skips it
    assert len((evidence / "runs.jsonl").read_text().splitlines()) == 2

    spec = importlib.util.spec_from_file_location("evidence_tables", TABLES)
    tables = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tables)
    monkeypatch.setattr(tables, "HERE", evidence)  # the tables of this sweep's report
    (evidence / "README.md").write_text(f"head\n{tables.BEGIN}\nstale\n{tables.END}\ntail\n")
    monkeypatch.setattr(sys, "argv", ["tables.py", "--write"])
    tables.main()
    written = (evidence / "README.md").read_text()
    assert written.startswith("head\n") and written.endswith("tail\n") and "stale" not in written
    delta = float(paired[0]["mean_delta"])
    assert f"| UAPS | 1 | {delta:+.4f} | n/a |" in written  # read from paired.csv, never bold with one pair
    assert "| supervised, seed 0 |" in written and "| UAPS, seed 0 |" in written
