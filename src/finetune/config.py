"""Where the Hydra configs live, the resolvers they use, instantiating a config node, and building a strategy by name.
How entry points report mistakes and failed jobs is finetune/run/failures.py; the sweep summary finetune/search/sweep_summary.py."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from omegaconf import OmegaConf

from finetune.errors import ConfigError, user_error


# The configs are package data (src/finetune/configs), so an installed wheel finds them as well as a checkout does.
# Add your own with `hydra.searchpath=[file://my_configs]` or `-cd my_configs`; FINETUNE_CONFIG_DIR replaces them.
CONFIG_DIR = str(Path(os.environ.get("FINETUNE_CONFIG_DIR", Path(__file__).resolve().parent / "configs")))


def auto_precision(accelerator: str = "auto") -> str:
    """bf16-mixed where a CUDA GPU with native bf16 (Ampere or newer) runs the job, 16-mixed on older GPUs (V100, T4:
    bf16 there is emulated and slow), 32-true on the CPU."""
    on_gpu = accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    if not on_gpu:
        return "32-true"
    return "bf16-mixed" if native_bf16() else "16-mixed"


def native_bf16() -> bool:
    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # torch < 2.3 has no including_emulation and counts only native support
        return torch.cuda.is_bf16_supported()


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("auto_precision"):
        OmegaConf.register_new_resolver("auto_precision", auto_precision)


def instantiate(node, **kwargs):
    """hydra.utils.instantiate, re-raising a user's ConfigError as itself rather than wrapped."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate as hydra_instantiate

    try:
        return hydra_instantiate(node, **kwargs)
    except InstantiationException as err:
        cause = user_error(err)
        if cause is None:
            raise
        raise cause from None


def compose_config(overrides: list[str], config_name: str = "train"):
    """The config `finetune-train <overrides>` would run, composed in this process (benchmarks, the head grid's
    callers): no run folder, no Hydra job."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name=config_name, overrides=list(overrides))


def config_dir_flags(hydra_cfg) -> list[str]:
    """`-cd <folder>` for the config folder this run's command line added (Hydra records it as a config source of
    provider "command-line", made absolute), for another command that must see the same configs."""
    return [flag for source in hydra_cfg.runtime.config_sources
            if source.provider == "command-line" and source.schema == "file" for flag in ("-cd", source.path)]


def strategy_names() -> list[str]:
    """Every strategy the package ships: one configs/strategy/<name>.yaml each (the only list there is)."""
    return sorted(p.stem for p in Path(CONFIG_DIR, "strategy").glob("*.yaml"))


def build_strategy(name: str, **overrides):
    """The strategy object configs/strategy/<name>.yaml describes, with `overrides` for the keys it has."""
    if name not in strategy_names():
        raise ConfigError(f"unknown strategy {name!r}; choose one of: {', '.join(strategy_names())}")
    # the strategy's own node, after the presets it builds on (`defaults: [gradual]`); paths as the defaults set them
    root = OmegaConf.create({"paths": {"cache_dir": "feature_cache"}, "strategy": _strategy_node(name)})
    for key, value in overrides.items():
        if key in root.strategy:
            root.strategy[key] = value
    return instantiate(root.strategy)


def _strategy_node(name: str):
    raw = OmegaConf.load(Path(CONFIG_DIR, "strategy", f"{name}.yaml"))
    node = OmegaConf.create({})
    for parent in raw.get("defaults", []):
        if isinstance(parent, str) and parent != "_self_":
            node = OmegaConf.merge(node, _strategy_node(parent))
    return OmegaConf.merge(node, raw.get("strategy", {}))


register_resolvers()
# Frozen parts sit in eval mode on purpose; Lightning's warning about it would only alarm users.
warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")
