"""Sweeps: job folder names, CPU threads per job, and the multirun manifest.

* ``job_dirname`` (an OmegaConf resolver) names a job's folder by the values of the keys the sweep varies
  (read from the sweeper's ``multirun.yaml``): sorted ``key=value`` pairs joined by commas, ``/`` replaced
  by ``-``, e.g. ``labeled_ratio=0.1,method=cps,seed=0``. Overrides common to all jobs (budgets, image
  sizes) stay out of the name. It depends only on the job's overrides, so rerunning a sweep finds its
  jobs' folders again.
* :func:`resolve_num_threads` gives each job ``cores // parallel jobs`` torch threads (``num_threads=auto``).
* :class:`SweepManifest` (a Hydra callback) writes ``<sweep dir>/manifest.json`` and ``manifest.csv``:
  one row per job with its overrides, folder, status (``trained``, ``resumed``, ``skipped``, ``failed``)
  and test mIoU.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from semiseg.errors import ConfigError
from semiseg.io import atomic_write_json, atomic_write_text
from semiseg.results import RESULTS_FILE

log = logging.getLogger("semiseg.sweeps")

MANIFEST_FILE = "manifest.json"
MANIFEST_CSV = "manifest.csv"
JOB_FILE = "job.json"


MAX_DIRNAME = 200


def job_dirname(override_dirname: str) -> str:
    """A folder name (one safe path component) from ``key=value,...`` text; ``default`` when empty."""
    name = str(override_dirname or "").replace(os.sep, "-").replace("/", "-").strip()
    if len(name) > MAX_DIRNAME:
        digest = hashlib.sha1(name.encode()).hexdigest()[:10]
        name = f"{name[: MAX_DIRNAME - 11]}-{digest}"
    return name or "default"


def swept_keys(sweep_dir: Path) -> set[str] | None:
    """Keys the multirun in ``sweep_dir`` varies (from ``multirun.yaml``), or ``None`` when unknown."""
    path = Path(sweep_dir) / "multirun.yaml"
    if not path.is_file():
        return None
    overrides = OmegaConf.load(path).hydra.overrides.task
    parsed = OverridesParser.create().parse_overrides([str(o) for o in overrides])
    return {o.get_key_element() for o in parsed if o.is_sweep_override()}


def job_folder_name() -> str:
    """The folder name of the current multirun job: its values of the swept keys (see module docstring)."""
    hydra_cfg = HydraConfig.get()
    excluded = set(hydra_cfg.job.config.override_dirname.exclude_keys)
    keys = swept_keys(Path(str(hydra_cfg.sweep.dir)))
    parsed = OverridesParser.create().parse_overrides([str(o) for o in hydra_cfg.overrides.task])
    items = sorted(
        f"{o.get_key_element()}={o.get_value_element_as_str()}"
        for o in parsed
        if o.get_key_element() not in excluded and (keys is None or o.get_key_element() in keys)
    )
    return job_dirname(",".join(items))


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("job_dirname"):
        OmegaConf.register_new_resolver("job_dirname", job_folder_name)
    if not OmegaConf.has_resolver("sweep_group"):
        OmegaConf.register_new_resolver("sweep_group", sweep_group)
    if not OmegaConf.has_resolver("experiment_name"):
        OmegaConf.register_new_resolver("experiment_name", experiment_name)
    if not OmegaConf.has_resolver("scale_steps"):
        OmegaConf.register_new_resolver("scale_steps", scale_steps)


def scale_steps(steps: int, fraction: float) -> int:
    """``${scale_steps:${trainer.max_steps},1.0526}``: a length in steps as a fraction of the budget, rounded up
    (ramp-ups that the papers set as a share of their runs keep that share when the budget changes)."""
    return max(1, math.ceil(int(steps) * float(fraction)))


def experiment_name() -> str:
    """The ``experiment=`` preset of this run (``none`` without one or outside a Hydra app)."""
    if not HydraConfig.initialized():
        return "none"
    return str(HydraConfig.get().runtime.choices.get("experiment") or "none")


def sweep_group(sweep_name: str) -> str:
    """The W&B group of a run: its sweep's name in a multirun, ``single-runs`` otherwise."""
    return str(sweep_name) if _is_multirun() else "single-runs"


def _is_multirun() -> bool:
    if not HydraConfig.initialized():
        return False
    return str(HydraConfig.get().mode).endswith("MULTIRUN")


def parallel_jobs() -> int:
    """How many jobs of this sweep share the machine (1 outside a joblib multirun)."""
    if not HydraConfig.initialized():
        return 1
    launcher = HydraConfig.get().launcher
    target = str(launcher.get("_target_", ""))
    if "joblib" in target.lower():
        n_jobs = int(launcher.get("n_jobs", -1))
        return os.cpu_count() or 1 if n_jobs < 1 else n_jobs
    return 1


def resolve_num_threads(value: int | str | None) -> int:
    """``num_threads``: an integer, or ``auto`` = cores (of the SLURM allocation when there is one) // jobs."""
    if value in (None, "auto"):
        cores = int(os.environ.get("SLURM_CPUS_PER_TASK", 0)) or len(os.sched_getaffinity(0))
        return max(1, cores // parallel_jobs())
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"num_threads={value!r} must be a positive integer or 'auto'")
    return value


# set by semiseg.train.train(): what the last run in this process did (read by SweepManifest.on_job_end)
LAST_ACTION: dict[str, str] = {}


def _metric(results: dict, key: str) -> float | None:
    value = results.get("metrics", {}).get(key)
    return None if value is None else float(value)


class SweepManifest(Callback):
    """Hydra callback: a record per job (``<job dir>/job.json``) and, when the multirun ends, the
    sweep's ``manifest.json`` and ``manifest.csv``.

    The per-job records are written by the process that ran the job (the main process, a joblib worker or
    a SLURM job), so the manifest is right whatever the launcher; it lists every job folder of the sweep
    dir, which after a resumed rerun includes the jobs of earlier invocations.
    """

    def __init__(self) -> None:
        self.started = time.time()

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.started = time.time()
        sweep_dir = Path(str(config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        self._write(sweep_dir, config, status="running")

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if not _is_multirun():
            return
        hydra_cfg = HydraConfig.get()
        job_dir = Path(hydra_cfg.runtime.output_dir)
        sweep_dir = Path(str(hydra_cfg.sweep.dir))
        failed = job_return.status == JobStatus.FAILED
        record: dict[str, Any] = {
            "num": int(hydra_cfg.job.num),
            "overrides": list(job_return.overrides or []),
            "dir": os.path.relpath(job_dir, sweep_dir),
            "status": "failed" if failed else LAST_ACTION.get("action", "trained"),
            "error": f"{type(job_return._return_value).__name__}: {job_return._return_value}" if failed else None,
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        results_path = job_dir / RESULTS_FILE
        if results_path.is_file():
            try:
                results = json.loads(results_path.read_text())
                record["test/mIoU"] = _metric(results, "test/mIoU")
                record["steps"] = results.get("steps")
            except (json.JSONDecodeError, AttributeError):
                record["test/mIoU"] = None
        atomic_write_json(job_dir / JOB_FILE, record)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        manifest = self._write(sweep_dir, config, status="finished")
        counts = manifest["counts"]
        log.info("sweep %s: %s -> %s", sweep_dir, counts, sweep_dir / MANIFEST_FILE)

    def _write(self, sweep_dir: Path, config: DictConfig, status: str) -> dict[str, Any]:
        jobs = collect_jobs(sweep_dir)
        counts: dict[str, int] = {}
        for job in jobs:
            counts[job["status"]] = counts.get(job["status"], 0) + 1
        manifest = {
            "sweep_dir": str(sweep_dir),
            "status": status,
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
            "overrides": list(config.hydra.overrides.task),
            "launcher": str(config.hydra.launcher.get("_target_", "")).rsplit(".", 1)[-1],
            "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(self.started)),
            "updated": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "counts": counts,
            "jobs": jobs,
        }
        atomic_write_json(sweep_dir / MANIFEST_FILE, manifest)
        atomic_write_text(sweep_dir / MANIFEST_CSV, jobs_csv(jobs))
        return manifest


def collect_jobs(sweep_dir: Path) -> list[dict[str, Any]]:
    """Every ``job.json`` under ``sweep_dir``, ordered by folder name."""
    jobs = []
    for path in sorted(Path(sweep_dir).rglob(JOB_FILE)):
        try:
            jobs.append(json.loads(path.read_text()))
        except json.JSONDecodeError:
            log.warning("unreadable job record %s", path)
    return sorted(jobs, key=lambda job: job.get("dir", ""))


def jobs_csv(jobs: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["num", "dir", "status", "test/mIoU", "steps", "overrides"])
    for job in jobs:
        writer.writerow(
            [job.get("num"), job.get("dir"), job.get("status"), job.get("test/mIoU"), job.get("steps"),
             " ".join(job.get("overrides", []))]
        )  # fmt: skip
    return buffer.getvalue()
