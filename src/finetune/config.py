"""Where the Hydra configs live, the resolvers they use, and how entry points report a mistake or a failed job."""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
import traceback
import warnings
from pathlib import Path

import torch
from hydra.experimental.callback import Callback
from omegaconf import OmegaConf

from finetune.errors import ConfigError

log = logging.getLogger("finetune")

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


def user_error(err: BaseException) -> ConfigError | None:
    """The ConfigError behind `err` (Hydra's instantiate and Lightning wrap or chain them), if there is one."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, ConfigError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


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


def one_line(err: ConfigError) -> str:
    """The message, also when a DataLoader worker re-raised it inside a traceback ('pkg.Class: message')."""
    line = str(err).strip().splitlines()[-1]
    prefix = f"{type(err).__module__}.{type(err).__name__}: "
    return line[len(prefix):] if line.startswith(prefix) else line


FAILURE_FILE = "failure.json"


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


def job_output_dir() -> Path | None:
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir) if HydraConfig.initialized() else None


def in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def record_failure(err: BaseException, message: str) -> None:
    """Write why the job failed into its own folder (rank 0 only), for the sweep summary and finetune-compare."""
    from hydra.core.hydra_config import HydraConfig
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    output_dir = job_output_dir()
    if output_dir is None or rank_zero_only.rank != 0:
        return
    hydra_cfg = HydraConfig.get()
    record = {"error": message, "type": type(err).__name__, "job": hydra_cfg.job.get("num"),
              "strategy": hydra_cfg.runtime.choices.get("strategy"),
              "overrides": list(hydra_cfg.overrides.task), "traceback": traceback.format_exc()}
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / FAILURE_FILE).write_text(json.dumps(record, indent=1))
    except OSError as write_error:
        log.warning("could not write %s (%s)", output_dir / FAILURE_FILE, write_error)


def report_user_errors(task):
    """Run an entry point's task. A ConfigError raised anywhere becomes one line on stderr and exit code 2; any
    failure is written to the job's failure.json. In a multirun the failed job returns None instead, so the sweep goes
    on (an Optuna sweeper records the trial as failed) and SweepSummary reports every failed job at the end."""

    @functools.wraps(task)
    def wrapper(*args, **kwargs):
        output_dir = job_output_dir()
        if output_dir is not None:
            (output_dir / FAILURE_FILE).unlink(missing_ok=True)  # a rerun into the same folder starts clean
        try:
            return task(*args, **kwargs)
        except Exception as err:
            cause = user_error(err)
            message = one_line(cause) if cause is not None else f"{type(err).__name__}: {first_line(err)}"
            record_failure(err, message)
            if in_multirun():
                log.error("job failed: %s", message, exc_info=cause is None)
                return None
            if cause is None:
                raise
            log.error(message)
            print(f"error: {message}", file=sys.stderr)
            sys.exit(2)

    return wrapper


def first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else ""


class SweepSummary(Callback):
    """Hydra callback: at the end of a multirun, list the jobs that failed (from their failure.json) and exit 1. A
    hyperparameter search instead writes and prints its best trial (best.json); failed trials are part of a search."""

    def on_multirun_end(self, config, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if (sweep_dir / "optimization_results.yaml").exists():
            from finetune.search import describe, summarise_search

            summary = summarise_search(sweep_dir, config.get("optimized_metric") or "val/acc",
                                       str(config.hydra.sweeper.get("direction", "maximize")))
            print(describe(summary, sweep_dir))
            return
        jobs = [p.parent.parent for p in sweep_dir.glob("**/.hydra/overrides.yaml")]
        failures = [json.loads(p.read_text()) | {"dir": str(p.parent)} for p in sorted(sweep_dir.glob(f"**/{FAILURE_FILE}"))]
        if not failures:
            return
        lines = [f"{len(failures)} of {len(jobs)} jobs failed (the others finished; see each failure.json):"]
        lines += [f"  job {f.get('job')} [{' '.join(f.get('overrides', []))}]: {f['error']}  ({f['dir']})"
                  for f in failures]
        print("\n".join(lines), file=sys.stderr)
        log.error("\n".join(lines))
        sys.exit(1)


register_resolvers()
# Frozen parts sit in eval mode on purpose; Lightning's warning about it would only alarm users.
warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")
