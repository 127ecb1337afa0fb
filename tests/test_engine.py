"""The run engine: one fit for every path, the package's import structure, and the two bugs the self-training
driver's copy of the training run caused (``best_val.step`` always null, ``logger=none`` refused)."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import torch

from semiseg.train import train

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "semiseg"

TINY_LOOP = [
    "method=im",
    "method.generations=0",
    "model=im_unet",
    "model.width_multiplier=0.25",
    "method.students_per_generation=2",
    "method.num_teachers=2",
    "trainer.max_steps=3",
    "trainer.val_check_interval=1",
    "callbacks.prediction_overlays.every_n_validations=0",
]


# ---- the import structure -------------------------------------------------------------------------------
def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_imports() -> dict[str, set[str]]:
    """Every module of ``semiseg`` -> the ``semiseg`` modules it imports anywhere in its text (module level,
    inside functions, under ``TYPE_CHECKING``); ``from a import b`` counts as importing ``a.b`` when that is a
    module, else ``a``."""
    modules = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets: set[str] = set()
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative import
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, *([base] if base else [])])
                for alias in node.names:
                    targets.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
        graph[name] = {target for target in targets if target in modules and target != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of ``graph`` (its modules in order, the first repeated at the end), or ``None``."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                return [*stack[stack.index(target) :], target]
            if target not in state and (cycle := visit(target)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_package_has_no_import_circle_and_never_imports_the_entry_point() -> None:
    graph = package_imports()
    assert {"semiseg.runner", "semiseg.results", "semiseg.train", "semiseg.report"} <= set(graph)
    assert "semiseg.runner" in graph["semiseg.methods.self_training.driver"]  # the graph does see imports
    assert find_cycle(graph) is None, f"import circle: {' -> '.join(find_cycle(graph) or [])}"
    importers = sorted(name for name, targets in graph.items() if "semiseg.train" in targets)
    assert importers == [], f"{importers} import the entry point semiseg.train"


def test_the_cycle_finder_finds_a_circle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


# ---- the two bugs of the self-training driver's copy ------------------------------------------------------
def test_best_val_step_of_a_self_training_run_is_its_best_checkpoints_step(make_cfg, tmp_path: Path) -> None:
    results = train(make_cfg(*TINY_LOOP))
    run_dir = tmp_path / "run"
    final = results["final_student"]
    record = json.loads(
        (run_dir / f"generation_{final['generation']}" / f"student_{final['student']}" / "student.json").read_text()
    )
    checkpoint = run_dir / results["checkpoint"]
    assert checkpoint.is_file() and checkpoint.name.startswith("best-step")
    step = results["best_val"]["step"]
    assert isinstance(step, int) and 1 <= step <= 3
    assert checkpoint.name == f"best-step{step}.ckpt"
    assert record["best_step"] == step and results["best_val"]["value"] == record["val"]


def test_self_training_runs_without_a_logger(make_cfg, tmp_path: Path) -> None:
    results = train(make_cfg(*TINY_LOOP, "logger=none"))
    assert results["steps"] == 3 and results["metrics"]["test/mIoU"] is not None
    assert not list((tmp_path / "run").rglob("csv")), "logger=none must write no logger directory"


def test_self_training_students_train_with_the_performance_settings(make_cfg, probe) -> None:
    train(make_cfg(*TINY_LOOP, "method.students_per_generation=1", "method.num_teachers=1",
                   "method.pseudo_labeler=single", "performance.channels_last=true"))  # fmt: skip
    assert probe.fits == 1 and probe.channels_last and all(probe.channels_last)


def results_classes(results: dict, run_dir: Path) -> list[str]:
    """The class names of the run's dataset, from the config it wrote."""
    from omegaconf import OmegaConf

    return list(OmegaConf.load(run_dir / "run" / results["config"]).dataset.class_names)


# ---- checkpoints: hyperparameters are plain data --------------------------------------------------------
def test_checkpoints_load_with_weights_only_and_rebuild_the_module(make_cfg, tmp_path: Path) -> None:
    from hydra.utils import get_class

    results = train(make_cfg("method=uaps"))
    checkpoint = torch.load(tmp_path / "run" / results["checkpoint"], map_location="cpu", weights_only=True)
    module = get_class(checkpoint["semiseg"]["method_class"])(**checkpoint["hyper_parameters"])
    module.load_state_dict(checkpoint["state_dict"])
    assert module.hparams == checkpoint["hyper_parameters"]
    assert module.class_names == checkpoint["semiseg"]["class_names"] == results_classes(results, tmp_path)
    assert module.optimizer_config == checkpoint["hyper_parameters"]["optimizer"]
