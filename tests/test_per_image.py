"""Every run writes the papers' per-image metric: ``test/mIoU_image`` in results.json and ``per_image.csv``."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from semiseg.train import train


def test_a_run_writes_per_image_csv_agreeing_with_results(make_cfg) -> None:
    cfg = make_cfg("method=supervised")
    results = train(cfg)
    run_dir = Path(cfg.paths.output_dir)
    for key in ("test/mIoU_image", "test/mDice_image", "test/mIoU"):
        assert 0.0 <= results["metrics"][key] <= 1.0
    with (run_dir / "per_image.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == results["split"]["test"]
    assert sorted(r["id"] for r in rows) == sorted(json.loads((run_dir / "split.json").read_text())["test"])
    assert [k for k in rows[0] if k.startswith("IoU/")] == [f"IoU/{n}" for n in cfg.dataset.class_names]
    scored = [float(r["mIoU_image"]) for r in rows if r["mIoU_image"]]
    assert sum(scored) / len(scored) == pytest.approx(results["metrics"]["test/mIoU_image"], abs=1e-6)
    # each row's mIoU_image is the mean of its defect classes' IoUs (the empty cells are the absent classes)
    for row in rows:
        defect = [float(row[f"IoU/{n}"]) for n in cfg.dataset.class_names[1:] if row[f"IoU/{n}"]]
        if not defect:
            assert row["mIoU_image"] == ""
        else:
            assert math.isclose(sum(defect) / len(defect), float(row["mIoU_image"]), abs_tol=1e-9)
