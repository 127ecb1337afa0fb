"""logger=wandb offline: run name, group, tags, resolved config, test metrics in the summary, the results
table; and the report's comparison table as a W&B Table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from conftest import compose_config
from semiseg.report import log_comparison, make_report
from semiseg.train import train


@pytest.fixture
def finished(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict[str, Any]:
    """Offline W&B; records what each run holds when it finishes."""
    from wandb.sdk import wandb_run

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    seen: dict[str, Any] = {}
    original = wandb_run.Run.finish

    def spy(self: Any, *args: Any, **kwargs: Any) -> Any:
        seen.update(summary=dict(self.summary), config=dict(self.config), name=self.name, group=self.group,
                    tags=tuple(self.tags), dir=Path(self.dir))  # fmt: skip
        return original(self, *args, **kwargs)

    monkeypatch.setattr(wandb_run.Run, "finish", spy)
    return seen


def test_wandb_run_offline(finished: dict, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    overrides = ["logger=wandb", "method=cps", "seed=3", "callbacks.prediction_overlays=null"]
    results = train(compose_config([*overrides, "model.channels=[4,8,16,32,64]"], run_dir))
    assert finished["name"] == "cps-synthetic-r0.1-s3" and finished["group"] == "single-runs"
    assert finished["tags"] == ("method/cps", "dataset/synthetic", "experiment/none", "ratio/0.1")
    summary = finished["summary"]
    assert summary["test/mIoU"] == pytest.approx(results["metrics"]["test/mIoU"])
    assert summary["method"] == "cps" and summary["seed"] == 3 and summary["steps"] == 2
    assert summary["results"]["_type"] == "table-file"
    assert finished["config"]["method"]["name"] == "cps" and finished["config"]["labeled_ratio"] == 0.1
    assert list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))  # ready for `wandb sync`


def test_report_table_to_wandb(finished: dict, tmp_path: Path) -> None:
    from test_report import write_run

    write_run(tmp_path / "sweep", "cps", 0.1, 0, 0.4)
    write_run(tmp_path / "sweep", "cps", 0.1, 1, 0.5)
    report = make_report([tmp_path / "sweep"])
    log_comparison(report["table"], report["plots"], "semiseg-test", "sweep-x", "test/mIoU")
    assert finished["group"] == "sweep-x"
    entry = finished["summary"]["comparison"]
    assert entry["_type"] == "table-file" and entry["nrows"] == 1
    table = json.loads((finished["dir"] / entry["path"]).read_text())
    assert table["data"] == [["cps", "0.4500 ± 0.0707 (2)"]]
