"""finetune-compare: every strategy on one backbone and dataset, once per seed (and per split with compare.splits);
a report that says what the data supports (intervals, paired differences to a reference chosen on val, verdicts, a
recommendation), a table and a figure.

`finetune-compare backbone=timm backbone.name=resnet18 data=image_folder data.root=...` applies the overrides to
every run. The runs are one Hydra sweep (`finetune-train -m strategy=... seed=...`) through Hydra's launcher: by
default `local_processes` (each run its own process, `compare.jobs` at a time, one GPU each where there are GPUs);
`hydra/launcher=slurm` sends every run to SLURM through submitit. `finetune-compare from=<folder>` builds the
report from a finished sweep or comparison.
"""

from __future__ import annotations

import importlib.util
import logging
import subprocess
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from finetune.compare import tune
from finetune.compare.decide import BEST_VAL, DEFAULT_MARGIN_POINTS
from finetune.compare.report import collect_runs, format_text, succeeded, write_report
from finetune.config import CONFIG_DIR, config_dir_flags
from finetune.errors import ConfigError
from finetune.run.failures import report_user_errors

log = logging.getLogger("finetune")
OWN_KEYS = ("from", "hydra.", "hydra/", "compare.", "strategy=", "task_name")
RUN_FOLDER = "${hydra.runtime.choices.strategy}_seed${seed}"
SPLIT_RUN_FOLDER = "${hydra.runtime.choices.strategy}_split${data.split_seed}_seed${seed}"


def available_strategies() -> list[str]:
    """Every strategy config Hydra can see: the package's, those in the user's -cd folder and on hydra.searchpath
    (which only a load with the run's hydra overrides adds)."""
    from hydra.core.global_hydra import GlobalHydra

    hydra_cfg = HydraConfig.get()
    return sorted(GlobalHydra.instance().config_loader().get_group_options(
        "strategy", config_name=hydra_cfg.job.config_name, overrides=list(hydra_cfg.overrides.hydra)))


def checked_seeds(seeds) -> list[int]:
    seeds = list(seeds or [])
    if not seeds:
        raise ConfigError("compare.seeds is empty: give at least one training seed, e.g. compare.seeds=[42,43,44]")
    if any(not isinstance(seed, int) or isinstance(seed, bool) for seed in seeds):
        raise ConfigError(f"compare.seeds={seeds}: the seeds must be integers, e.g. compare.seeds=[42,43,44]")
    repeated = sorted({seed for seed in seeds if seeds.count(seed) > 1})
    if repeated:
        raise ConfigError(f"compare.seeds={seeds} repeats {repeated}: each seed once (a repeat would count one "
                          f"run twice in the intervals and tests)")
    return seeds


def checked_statistics(cfg: DictConfig) -> dict:
    """compare.alpha, compare.margin (accuracy points), compare.reference and compare.splits, refused in one line when
    out of range."""
    alpha = float(cfg.compare.get("alpha", 0.05))
    if not 0 < alpha < 1:
        raise ConfigError(f"compare.alpha={alpha} must be between 0 and 1 (e.g. 0.05)")
    margin = cfg.compare.get("margin", DEFAULT_MARGIN_POINTS)
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not 0 < margin < 100:
        raise ConfigError(f"compare.margin={margin} is in accuracy points and must lie strictly between 0 and 100 "
                          f"(e.g. {DEFAULT_MARGIN_POINTS:g}: equivalent means within +-{DEFAULT_MARGIN_POINTS:g} points)")
    splits = cfg.compare.get("splits", 1)
    if isinstance(splits, bool) or not isinstance(splits, int) or splits < 1:
        raise ConfigError(f"compare.splits={splits} must be an integer of at least 1 (1: the one split of "
                          f"data.split_seed; K: data.split_seed, +1, ..., +K-1)")
    reference = str(cfg.compare.get("reference") or BEST_VAL)
    return {"alpha": alpha, "margin_points": float(margin), "reference": reference, "splits": splits}


def checked_reference(reference: str, strategies: list[str]) -> None:
    if reference != BEST_VAL and reference not in strategies:
        raise ConfigError(f"compare.reference={reference} is not among the strategies compared; choose one of: "
                          f"{', '.join([BEST_VAL, *strategies])}")


def split_seeds(cfg: DictConfig, splits: int) -> list[int]:
    """data.split_seed, then the next splits - 1 integers: one stratified split each."""
    first = int(cfg.data.get("split_seed", 0) or 0)
    return [first + k for k in range(splits)]


def train_command(cfg: DictConfig, drop: tuple[str, ...] = (), several_splits: bool = False,
                  hydra_cfg: DictConfig | None = None) -> list[str]:
    """`finetune-train -m` with the user's overrides (less `drop`ped keys: those the tuning sets) and the launcher
    chosen for this compare (hydra/launcher=..., hydra.launcher.*), from this compare's Hydra config (`hydra_cfg`,
    taken before anything ran; by default the current one)."""
    hydra_cfg = hydra_cfg if hydra_cfg is not None else HydraConfig.get()
    own = OWN_KEYS + (("data.split_seed=",) if several_splits else ()) + tuple(f"{key}=" for key in drop)
    task = [o for o in hydra_cfg.overrides.task if not o.lstrip("+~").startswith(own)]
    launcher = hydra_cfg.runtime.choices.get("hydra/launcher", "local_processes")
    passed = [o for o in hydra_cfg.overrides.hydra if o.startswith(("hydra.launcher.", "hydra.searchpath"))]
    if launcher == "local_processes" and not any(o.startswith("hydra.launcher.jobs=") for o in passed):
        passed.append(f"hydra.launcher.jobs={int(cfg.compare.get('jobs', 1))}")
    return [sys.executable, "-m", "finetune.train", *config_dir_flags(hydra_cfg), "-m", *task,
            f"hydra/launcher={launcher}", *passed]


def sweep_command(strategies: list[str], seeds: list[int], cfg: DictConfig, output_dir: Path,
                  splits: list[int] | None = None, tuned: list[str] | None = None,
                  hydra_cfg: DictConfig | None = None, split_folders: bool | None = None) -> list[str]:
    """The `finetune-train -m` sweep of strategies x seeds (x data.split_seed when `splits` has more than one): the
    user's overrides for every run (with `tuned`, the overrides a tuning chose, in place of the user's for those
    keys), each run in <output_dir>/<strategy>_seed<seed> (<strategy>_split<k>_seed<seed> when the comparison has
    several splits, `split_folders`, even if this sweep runs one of them)."""
    several = split_folders if split_folders is not None else (splits is not None and len(splits) > 1)
    tuned = list(tuned or [])
    split_sweep = [f"data.split_seed={','.join(str(k) for k in splits)}"] if several else []
    return [*train_command(cfg, tuple(o.split("=", 1)[0] for o in tuned), several, hydra_cfg),
            f"strategy={','.join(strategies)}", f"seed={','.join(str(s) for s in seeds)}", *split_sweep, *tuned,
            f"hydra.sweep.dir={output_dir}", f"hydra.sweep.subdir={SPLIT_RUN_FOLDER if several else RUN_FOLDER}"]


def strategy_config(strategy: str, extra: tuple[str, ...] = ()) -> DictConfig:
    """The train config one strategy's runs compose: the user's overrides and config folders, strategy=`strategy`,
    and `extra` overrides (a split's data.split_seed)."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.types import RunMode
    from omegaconf import open_dict

    hydra_cfg = HydraConfig.get()
    task = [o for o in hydra_cfg.overrides.task if not o.lstrip("+~").startswith(("strategy=", "from="))]
    cfg = GlobalHydra.instance().config_loader().load_configuration(
        config_name=hydra_cfg.job.config_name,
        overrides=[*hydra_cfg.overrides.hydra, *task, f"strategy={strategy}", *extra],
        run_mode=RunMode.RUN)
    with open_dict(cfg):
        cfg.pop("hydra", None)
    return cfg


def cached_config_for(strategy_cfg: DictConfig, extra: tuple[str, ...] = ()) -> DictConfig:
    """strategy=cached with the same backbone, data and feature settings as `strategy_cfg` (lp_ft's probe): the
    head grid's features are the entry that strategy's runs read."""
    from omegaconf import open_dict

    cfg = strategy_config("cached", extra)
    with open_dict(cfg):
        for key in ("cache_dir", "feature_dtype", "shard_rows", "extract_batch_size"):
            if key in strategy_cfg.strategy:
                cfg.strategy[key] = strategy_cfg.strategy[key]
    return cfg


def tune_all(strategies: list[str], cfg: DictConfig, budget: tune.Budget, output_dir: Path,
             splits: list[int]) -> dict[int, dict[str, dict]]:
    """{split seed: {strategy: its tuning.json}}: with several splits each split tunes on its own val, since a
    split's val images are other splits' test images. Every search space is checked before the first trial runs."""
    if importlib.util.find_spec("optuna") is None:
        raise ConfigError(f"compare.tune.trials={budget.trials} tunes through Optuna, which is not installed: pip "
                          f"install 'finetune[search]' (or compare.tune.trials=0: every strategy as configured)")
    several = len(splits) > 1
    extra = {k: (f"data.split_seed={k}",) if several else () for k in splits}
    # every config composed and every space checked before the first trial runs
    configs = {(s, k): strategy_config(s, extra[k]) for k in splits for s in strategies}
    # a key the user set on the command line stays as given (not tuned): the user's value wins over the space
    typed = {o.lstrip("+~").split("=", 1)[0] for o in HydraConfig.get().overrides.task if "=" in o}
    plans = {key: tune.plan_of(key[0], config, tuple(typed)) for key, config in configs.items()}
    for strategy in strategies:
        if plans[strategy, splits[0]].pinned:
            log.info("tune %s: %s set by your overrides, not tuned", strategy,
                     ", ".join(plans[strategy, splits[0]].pinned))
    cached = {key: configs[key] if strategy_is_cached(configs[key]) else cached_config_for(configs[key], extra[key[1]])
              for key, plan in plans.items() if plan.grid_keys}
    # the space's keys are the trials' to set; data.split_seed is the split's
    bases = {key: [*train_command(cfg, tuple(plan.space), several), *extra[key[1]]] for key, plan in plans.items()}
    jobs = int(cfg.compare.get("jobs", 1))
    records: dict[int, dict[str, dict]] = {k: {} for k in splits}
    for (strategy, k), plan in plans.items():
        folder = f"split{k}/{strategy}" if several else strategy
        if plan.method == "untuned":
            records[k][strategy] = tune.untuned_record(strategy, budget, output_dir, plan.pinned, folder)
            continue
        records[k][strategy] = tune.tune_strategy(plan, configs[strategy, k], cached.get((strategy, k)), budget,
                                                  bases[strategy, k], output_dir, jobs,
                                                  run=lambda command: run_sweep(command), folder=folder)
        if several:
            records[k][strategy]["split_seed"] = k
        print(tune.describe(records[k][strategy]) + (f" (split {k})" if several else ""), flush=True)
    return records


def strategy_is_cached(cfg: DictConfig) -> bool:
    from hydra.utils import get_class

    from finetune.strategies import CachedFeatures

    return issubclass(get_class(cfg.strategy._target_), CachedFeatures)


def run_sweep(command: list[str]) -> int:
    """The sweep in its own process (its launcher starts the runs); its exit code (1 when some runs failed)."""
    log.info("compare: %s", " ".join(command[1:]))
    return subprocess.run(command).returncode


def statistics_of_report(statistics: dict) -> dict:
    return {key: statistics[key] for key in ("alpha", "margin_points", "reference")}


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="compare")
@report_user_errors
def main(cfg: DictConfig) -> None:
    output_dir = Path(HydraConfig.get().runtime.output_dir)
    source = cfg.get("from")
    statistics = checked_statistics(cfg)
    if source:
        if not Path(source).is_dir():
            raise ConfigError(f"from={source} is not a folder (expected a multirun or compare output folder)")
        rows = collect_runs(source)
        if not succeeded(rows):
            raise ConfigError(f"from={source} holds no <run>/metrics.json"
                              + (f" ({len(rows)} failed runs)" if rows else ""))
        checked_reference(statistics["reference"], sorted({r["strategy"] for r in succeeded(rows)}))
        expected = []
    else:
        available = available_strategies()
        strategies = list(cfg.compare.strategies or available)
        unknown = [s for s in strategies if s not in available]
        if unknown:
            raise ConfigError(f"compare.strategies has {unknown}; choose from: {', '.join(available)}")
        if any(o.startswith(("seed=", "+seed=")) for o in HydraConfig.get().overrides.task):
            raise ConfigError("finetune-compare trains every strategy once per seed of compare.seeds: set "
                              "compare.seeds=[...] instead of seed=")
        seeds = checked_seeds(cfg.compare.seeds)
        checked_reference(statistics["reference"], strategies)
        splits = split_seeds(cfg, statistics["splits"])
        budget = tune.checked_budget(cfg.compare.get("tune"), seeds)
        hydra_cfg = HydraConfig.get()  # this compare's, whatever a sweep run in this process sets afterwards
        tunings = tune_all(strategies, cfg, budget, output_dir, splits) if budget.trials else {}
        chosen = {s: any(tunings[k][s].get("overrides") for k in splits) for s in strategies} if tunings else {}
        as_configured = [s for s in strategies if not chosen.get(s)]
        if as_configured:
            run_sweep(sweep_command(as_configured, seeds, cfg, output_dir, splits, hydra_cfg=hydra_cfg))
        for strategy in strategies:  # each tuned strategy's test runs at its own chosen configuration (per split)
            for k in (splits if strategy not in as_configured else []):
                run_sweep(sweep_command([strategy], seeds, cfg, output_dir, [k], tunings[k][strategy]["overrides"],
                                        hydra_cfg, split_folders=len(splits) > 1))
        rows = collect_runs(output_dir)
        if not succeeded(rows):
            raise ConfigError(f"every run failed; see the train.log files under {output_dir}")
        expected = [f"{s}_seed{seed}" if len(splits) == 1 else f"{s}_split{k}_seed{seed}"
                    for s in strategies for k in splits for seed in seeds]
    tunings = tune.read_tunings(source or output_dir)  # {} for a sweep, an untuned or an older comparison
    paths, summary = write_report(rows, output_dir, title=cfg.compare.title, tunings=tunings,
                                  **statistics_of_report(statistics))
    print(format_text(summary))
    reported = {Path(r["run_dir"]).name for r in rows}
    unreported = [name for name in expected if name not in reported]
    if unreported:  # died without writing failure.json (killed, out of memory)
        print(f"failed: {', '.join(unreported)} (see their train.log)")
    print(f"report: {', '.join(str(paths[k]) for k in ('md', 'csv', 'png', 'per_class', 'tuning') if k in paths)}")


if __name__ == "__main__":
    main()
