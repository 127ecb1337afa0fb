"""Where the Hydra configs live and how to compose one outside a command line (tests, benchmarks, notebooks)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig, open_dict

from semiseg import sweeps

CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "conf")


def compose_config(
    overrides: Sequence[str] = (), output_dir: Path | str | None = None, config_name: str = "train"
) -> DictConfig:
    """The config ``config_name`` (``conf/<config_name>.yaml``) with ``overrides`` applied, as the app would see
    it; ``output_dir`` sets ``paths.output_dir`` (which Hydra's run directory sets on the command line)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    sweeps.register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=list(overrides))
    if output_dir is not None:
        with open_dict(cfg):
            cfg.paths.output_dir = str(output_dir)
    return cfg
