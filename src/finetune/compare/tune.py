"""The comparison's tuning: every strategy tried on val under one budget (compare.tune) before any test run, and its
best configuration handed on to the seeded test runs.

- What is tuned is the strategy's own `search_space:` block (its YAML), in Optuna's override syntax; a strategy
  without one runs as configured and is reported "untuned".
- Head-only keys tune in one pass: a strategy class that names `head_grid_keys` (cached: its lr and weight decay;
  lp_ft: its probe's lr) has those keys tried by the head grid, all `trials` configurations' heads trained at once on
  the cached features (head_grid.py). The rest tune through the Optuna sweeper (hydra/sweeper=optuna), with pruning
  on per-epoch val, each trial a `finetune-train test=false` run: the test split is never evaluated while tuning.
- The budget is the same for every strategy: `trials` configurations, a wall-clock cap, one tuning seed that is not
  among the final seeds.

Everything a tuning did is in <compare folder>/tune/<strategy>/tuning.json (the report reads it).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from finetune.errors import ConfigError
from finetune.run import folders

log = logging.getLogger("finetune")

TUNE_DIR = "tune"
TUNING_FILE = "tuning.json"
OPTIMIZED = "val/acc"
PRUNERS = ("median", "hyperband", "successive_halving", "none")


@dataclass(frozen=True)
class Budget:
    """compare.tune: configurations tried per strategy, a wall-clock cap (minutes, per strategy), the seed of every
    tuning run, the pruner of the Optuna trials and the epochs every trial runs before it may be pruned."""
    trials: int
    max_minutes: float | None
    seed: int
    pruner: str
    warmup_epochs: int = 2


def checked_budget(tune: DictConfig | dict | None, seeds: list[int]) -> Budget:
    """compare.tune, refused in one line when out of range."""
    tune = dict(tune or {})
    trials = tune.get("trials", 0)
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 0:
        raise ConfigError(f"compare.tune.trials={trials} must be an integer of at least 0 (0: every strategy runs as "
                          f"configured; N: N configurations tried on val per strategy)")
    minutes = tune.get("max_minutes")
    if minutes is not None and (isinstance(minutes, bool) or not isinstance(minutes, (int, float)) or
                                not minutes > 0):
        raise ConfigError(f"compare.tune.max_minutes={minutes} must be a number of minutes above 0, or null for no "
                          f"cap")
    seed = tune.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"compare.tune.seed={seed} must be an integer")
    if trials and seed in seeds:
        raise ConfigError(f"compare.tune.seed={seed} is one of compare.seeds={seeds}: the tuning's seed must differ "
                          f"from the final runs' seeds (their test accuracy would reuse the run that chose them)")
    pruner = str(tune.get("pruner", "median"))
    if pruner not in PRUNERS:
        raise ConfigError(f"compare.tune.pruner={pruner}; choose one of: {', '.join(PRUNERS)}")
    warmup = tune.get("warmup_epochs", 2)
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ConfigError(f"compare.tune.warmup_epochs={warmup} must be an integer of at least 0 (epochs every trial "
                          f"runs before the pruner may stop it)")
    return Budget(trials, float(minutes) if minutes is not None else None, seed, pruner, warmup)


# -- what each strategy tunes


@dataclass
class Plan:
    """One strategy's tuning: its space split into the head grid's keys and Optuna's, and how the grid reads them."""
    strategy: str
    space: dict[str, str]
    grid_keys: dict[str, str]  # config key -> "lr" | "weight_decay"
    grid_epochs_key: str = "trainer.max_epochs"
    # the space's keys the user's overrides fix: not tuned, the user's value kept
    pinned: dict[str, str] = field(default_factory=dict)
    # epochs before the pruner may stop a trial: until every phase (and so every tuned key) has started
    warmup_epochs: int = 0
    # the configured value of every key, where it lies in the space: tried first
    configured: dict = field(default_factory=dict)

    @property
    def method(self) -> str:
        if not self.space:
            return "untuned"
        optuna_keys = [k for k in self.space if k not in self.grid_keys]
        return "+".join(m for m, used in (("head_grid", bool(self.grid_keys)), ("optuna", bool(optuna_keys)))
                        if used)


def checked_space(strategy: str, cfg: DictConfig) -> dict[str, str]:
    """The strategy's search_space as {config key: Optuna override value}, null entries (a preset dropping a key it
    inherits) left out; refused in one line when a key names no config field or a range is empty or inverted."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    from hydra_plugins.finetune_optuna_sweeper.optuna_sweeper import (
        distribution_from_override,
    )

    raw = cfg.get("search_space")
    if raw is None:
        return {}
    if not isinstance(raw, DictConfig) or OmegaConf.is_list(raw):
        raise ConfigError(f"strategy {strategy}: search_space must map config keys to ranges, e.g. "
                          f"optimizer.lr: tag(log, interval(1e-5, 1e-2))")
    nested = [str(k) for k, v in raw.items() if isinstance(v, DictConfig)]
    if nested:
        raise ConfigError(f"strategy {strategy}: search_space {nested[0]} holds a mapping; write each entry as a "
                          f"dotted config key and a range, e.g. optimizer.lr: tag(log, interval(1e-5, 1e-2))")
    space = {str(k): str(v) for k, v in raw.items() if v is not None}
    missing = object()
    for key, value in space.items():
        if key.startswith(("search_space", "hydra", "seed", "test", "compare")) or \
                OmegaConf.select(cfg, key, default=missing, throw_on_resolution_failure=False) is missing:
            raise ConfigError(f"strategy {strategy}: search_space key {key} names no field of its config; give a "
                              f"dotted config key such as optimizer.lr, optimizer.weight_decay or strategy.<field>")
        try:
            override = OverridesParser.create().parse_overrides([f"{key}={value}"])[0]
        except OverrideParseException as err:  # the override grammar's refusal
            raise ConfigError(f"strategy {strategy}: search_space {key}: {value} is not a range Optuna reads "
                              f"({str(err).strip().splitlines()[-1]}); e.g. tag(log, interval(1e-5, 1e-2)), "
                              f"interval(0.0, 0.5), choice(4, 8, 16)") from None
        if not override.is_sweep_override():
            raise ConfigError(f"strategy {strategy}: search_space {key}: {value} is one value, not a range; give "
                              f"interval(low, high), tag(log, interval(low, high)) or choice(a, b, ...)")
        if override.is_interval_sweep():
            low, high = override.value().start, override.value().end
            if not low < high:
                raise ConfigError(f"strategy {strategy}: search_space {key}: {value} is an empty or inverted range "
                                  f"(low {low} must be below high {high})")
            if "log" in override.value().tags and not low > 0:
                raise ConfigError(f"strategy {strategy}: search_space {key}: {value} is on a log scale and needs a "
                                  f"low end above 0")
        distribution = distribution_from_override(override)
        if hasattr(distribution, "choices") and len(distribution.choices) < 2:
            raise ConfigError(f"strategy {strategy}: search_space {key}: {value} offers fewer than two choices")
    return space


def plan_of(strategy: str, cfg: DictConfig, pinned_keys: tuple[str, ...] = ()) -> Plan:
    """What `strategy` tunes and how; `pinned_keys`: the keys the user's overrides set (they stay as given)."""
    from hydra.utils import get_class

    space = checked_space(strategy, cfg)
    pinned = {k: str(OmegaConf.select(cfg, k)) for k in space if k in pinned_keys}
    space = {k: v for k, v in space.items() if k not in pinned}
    strategy_class = get_class(cfg.strategy._target_)
    grid = {}
    if getattr(strategy_class, "head_grid_applies", lambda strategy_cfg: True)(cfg.strategy):
        grid = {k: v for k, v in getattr(strategy_class, "head_grid_keys", {}).items() if k in space}
    for key in grid:
        if not space[key].replace(" ", "").startswith(("tag(log,interval(", "interval(")):
            raise ConfigError(f"strategy {strategy}: search_space {key}: {space[key]}: the head grid tries numbers "
                              f"in a range; give interval(low, high) or tag(log, interval(low, high))")
    return Plan(strategy, space, grid, getattr(strategy_class, "head_grid_epochs_key", "trainer.max_epochs"), pinned,
                warmup_epochs(cfg), configured_values(cfg, space))


def warmup_epochs(cfg: DictConfig) -> int:
    """The epoch the strategy's last phase starts at (0 for one phase): a staged strategy's later knobs (lp_ft's
    fine-tuning lr, a phase's lr) change nothing before it, so pruning before it would judge noise."""
    from hydra.utils import instantiate

    try:
        strategy = instantiate(cfg.strategy)
        return int(strategy.phase_start_epochs()[-1])
    except Exception:  # noqa: BLE001 - one that cannot be built here (a missing optional package): no warm-up
        return 0


def configured_values(cfg: DictConfig, space: dict[str, str]) -> dict:
    """{key: the config's own value} for the keys whose value lies in their range: the tuning tries it first, so
    the tuned choice is never worse on val than the configuration as shipped (at the tuning seed)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from hydra_plugins.finetune_optuna_sweeper.optuna_sweeper import (
        distribution_from_override,
    )

    values = {}
    for key, value in space.items():
        distribution = distribution_from_override(OverridesParser.create().parse_overrides([f"{key}={value}"])[0])
        current = OmegaConf.select(cfg, key, throw_on_resolution_failure=False)
        if isinstance(current, (int, float)) and not isinstance(current, bool) and hasattr(distribution, "low"):
            if distribution.low <= current <= distribution.high:
                values[key] = current
        elif hasattr(distribution, "choices") and current in distribution.choices:
            values[key] = current
    return values


# -- the head grid: `trials` heads at once on the cached features


def latin_hypercube(space: dict[str, str], trials: int, seed: int) -> list[dict[str, float]]:
    """`trials` points of the (interval) space, each dimension cut into `trials` strata taken once each (a seeded
    Latin hypercube): every configuration a different lr, spread over its whole range."""
    from hydra_plugins.finetune_optuna_sweeper.optuna_sweeper import search_space

    distributions, _ = search_space([f"{k}={v}" for k, v in space.items()])
    rng = np.random.default_rng(seed)
    points: list[dict] = [{} for _ in range(trials)]
    for key, distribution in distributions.items():
        strata = (rng.permutation(trials) + rng.random(trials)) / trials
        low, high = float(distribution.low), float(distribution.high)
        values = (np.exp(np.log(low) + strata * (np.log(high) - np.log(low))) if distribution.log
                  else low + strata * (high - low))
        for point, value in zip(points, values):
            point[key] = float(f"{value:.4g}")
    return points


def run_head_grid(plan: Plan, cfg: DictConfig, cached_cfg: DictConfig, budget: Budget) -> tuple[dict, list[dict]]:
    """The grid's chosen {key: value} and one trial record per configuration."""
    from finetune.compare.head_grid import fit_head_grid

    space = {k: plan.space[k] for k in plan.grid_keys}
    points = latin_hypercube(space, budget.trials, budget.seed)
    configured = {k: plan.configured[k] for k in space if k in plan.configured}
    if len(configured) == len(space):  # the configuration as shipped is one of the heads
        points[0] = {k: float(v) for k, v in configured.items()}
    fixed = {"lr": float(cfg.optimizer.lr), "weight_decay": float(cfg.optimizer.weight_decay)}
    grid = [fixed | {plan.grid_keys[k]: v for k, v in point.items()} for point in points]
    with_seed = cached_cfg.copy()
    with_seed.seed = budget.seed
    result = fit_head_grid(with_seed, grid, epochs=int(OmegaConf.select(cfg, plan.grid_epochs_key)))
    trials = [{"number": i, "method": "head_grid", "params": point, "state": "COMPLETE",
               "val_acc": head["best_val_acc"], "epochs": len(head["val_acc"]), "val_curve": head["val_acc"]}
              for i, (point, head) in enumerate(zip(points, result["heads"]))]
    best = max(trials, key=lambda t: (t["val_acc"], -t["number"]))
    return best["params"], trials, result


# -- Optuna: a `finetune-train -m hydra/sweeper=optuna test=false` sweep per strategy


def optuna_command(plan: Plan, budget: Budget, base: list[str], fixed: dict, sweep_dir: Path, jobs: int,
                   seconds_left: float | None = None) -> list[str]:
    keys = [k for k in plan.space if k not in plan.grid_keys]
    space = [f"{k}={plan.space[k]}" for k in keys]
    cap = [f"hydra.sweeper.timeout={max(seconds_left, 1.0):.0f}"] if seconds_left is not None else []
    pruner = budget.pruner
    warmup = max(plan.warmup_epochs, budget.warmup_epochs)
    if pruner == "median" and warmup:
        pruner = f"{{_target_:optuna.pruners.MedianPruner,n_warmup_steps:{warmup}}}"
    first = {k: plan.configured[k] for k in keys if k in plan.configured}
    enqueue = ([f"hydra.sweeper.enqueue=[{{{','.join(f'{k}:{v!r}' for k, v in first.items())}}}]"]
               if len(first) == len(keys) else [])
    return [*base, f"strategy={plan.strategy}", f"seed={budget.seed}", "test=false", f"optimized_metric={OPTIMIZED}",
            *[f"{k}={v}" for k, v in fixed.items()], *space, "hydra/sweeper=optuna",
            "hydra.sweeper.direction=maximize", f"hydra.sweeper.n_trials={budget.trials}",
            f"hydra.sweeper.n_jobs={jobs}", f"hydra.sweeper.pruner={pruner}", *enqueue,
            f"hydra.sweeper.sampler.seed={budget.seed}", f"hydra.sweeper.study_name=tune_{plan.strategy}",
            "hydra.sweeper.max_failure_rate=1.0", *cap, f"hydra.sweep.dir={sweep_dir}",
            "hydra.sweep.subdir=trial${hydra.job.num}"]


def optuna_trials(sweep_dir: Path) -> tuple[dict, list[dict], bool]:
    """The study's best parameters, one record per trial (state, val score, epochs, its run's fit seconds) and
    whether the wall-clock cap stopped it."""
    import optuna
    import yaml

    from finetune.search.pruning import open_storage
    from hydra_plugins.finetune_optuna_sweeper.optuna_sweeper import (
        JOURNAL_FILE,
        RESULTS_FILE,
        RUN_DIR_ATTR,
        counts_toward_n_trials,
    )

    results = yaml.safe_load((sweep_dir / RESULTS_FILE).read_text())
    study = optuna.load_study(study_name=results["study_name"], storage=open_storage(str(sweep_dir / JOURNAL_FILE)))
    trials = []
    for trial in study.get_trials(deepcopy=False):
        if not counts_toward_n_trials(trial):
            continue
        run_dir = trial.user_attrs.get(RUN_DIR_ATTR)
        metrics = (folders.metrics(Path(run_dir)) if run_dir else None) or {}
        curve = [trial.intermediate_values[k] for k in sorted(trial.intermediate_values)]
        value = trial.value if trial.state == optuna.trial.TrialState.COMPLETE else (curve[-1] if curve else None)
        trials.append({"number": trial.number, "method": "optuna", "params": dict(trial.params),
                       "state": trial.state.name, "val_acc": value, "epochs": len(curve), "val_curve": curve,
                       "fit_seconds": metrics.get("fit_seconds"), "extract_seconds": metrics.get("extract_seconds"),
                       "tested": metrics.get("tested"), "run_dir": run_dir})
    return dict(results.get("best_params") or {}), trials, bool(results.get("timed_out"))


# -- one strategy, start to end


def tune_strategy(plan: Plan, cfg: DictConfig, cached_cfg: DictConfig | None, budget: Budget, base: list[str],
                  output_dir: Path, jobs: int, run: Callable[[list[str]], int],
                  folder: str | None = None) -> dict:
    """Tune one strategy; writes and returns its tuning.json in <output_dir>/tune/<folder> (default: the strategy's
    name). `run` runs a command (the Optuna sweep: compare/cli.py's run_sweep)."""
    folder = output_dir / TUNE_DIR / (folder or plan.strategy)
    folder.mkdir(parents=True, exist_ok=True)
    record = {"strategy": plan.strategy, "method": plan.method, "trials_budget": budget.trials,
              "max_minutes": budget.max_minutes, "seed": budget.seed, "pruner": budget.pruner, "space": plan.space,
              "chosen": {}, "trials": [], "timed_out": False}
    if plan.pinned:
        record["pinned"] = plan.pinned
    started = time.perf_counter()
    device_seconds = extract_seconds = 0.0
    if plan.grid_keys:
        chosen, trials, result = run_head_grid(plan, cfg, cached_cfg, budget)
        record["chosen"].update(chosen)
        record["trials"] += trials
        device_seconds += float(result["seconds"])
        extract_seconds += float(result.get("extract_seconds") or 0.0)
        log.info("tune %s: head grid of %d in %.1fs, chosen %s", plan.strategy, len(trials), result["seconds"], chosen)
    if "optuna" in plan.method:
        sweep_dir = folder / "optuna"
        left = 60 * budget.max_minutes - (time.perf_counter() - started) if budget.max_minutes else None
        command = optuna_command(plan, budget, base, record["chosen"], sweep_dir, jobs, left)
        code = run(command)
        if not (sweep_dir / "optimization_results.yaml").exists():
            return failed_record(record, folder, f"its Optuna sweep ended (exit {code}) without a result; see the "
                                                 f"train.log files under {sweep_dir}")
        best, trials, record["timed_out"] = optuna_trials(sweep_dir)
        if not best:
            record["trials"] += trials
            return failed_record(record, folder, f"none of its {len(trials)} trials finished; see the train.log "
                                                 f"files under {sweep_dir}")
        record["chosen"].update(best)
        offset = len(record["trials"])
        record["trials"] += [t | {"number": offset + t["number"]} for t in trials]
        device_seconds += sum(float(t.get("fit_seconds") or 0.0) for t in trials)
        extract_seconds += sum(float(t.get("extract_seconds") or 0.0) for t in trials)
    states = [t["state"] for t in record["trials"]]
    scored = [t for t in record["trials"] if t["state"] == "COMPLETE" and t["val_acc"] is not None]
    record.update(run=len(states), pruned=states.count("PRUNED"), failed=states.count("FAIL"),
                  best_val_acc=max((t["val_acc"] for t in scored), default=None),
                  wall_seconds=round(time.perf_counter() - started, 3),
                  # the training the tuning paid for; a feature extraction is charged once to the strategy anyway
                  device_seconds=round(device_seconds, 3), extract_seconds=round(extract_seconds, 3),
                  overrides=[f"{k}={v}" for k, v in record["chosen"].items()], shown=shown(record["chosen"]))
    (folder / TUNING_FILE).write_text(json.dumps(record, indent=1))
    return record


def failed_record(record: dict, folder: Path, reason: str) -> dict:
    """A tuning that could not choose: the strategy runs as configured, and the report says why."""
    log.warning("tune %s failed: %s; it runs as configured", record["strategy"], reason)
    states = [t["state"] for t in record["trials"]]
    record.update(method=f"{record['method']} (failed)", reason=f"tuning failed: {reason}", chosen={}, overrides=[],
                  shown="", run=len(states), pruned=states.count("PRUNED"), failed=states.count("FAIL"),
                  best_val_acc=None, wall_seconds=0.0, device_seconds=round(sum(
                      float(t.get("fit_seconds") or 0.0) for t in record["trials"]), 3), extract_seconds=0.0)
    (folder / TUNING_FILE).write_text(json.dumps(record, indent=1))
    return record


def untuned_record(strategy: str, budget: Budget, output_dir: Path, pinned: dict | None = None,
                   folder: str | None = None) -> dict:
    reason = ("your overrides set every key of its search_space: it runs as given" if pinned else
              "its config has no search_space: it runs as configured")
    record = {"strategy": strategy, "method": "untuned", "trials_budget": budget.trials, "space": {}, "chosen": {},
              "trials": [], "run": 0, "pruned": 0, "failed": 0, "wall_seconds": 0.0, "device_seconds": 0.0,
              "extract_seconds": 0.0, "overrides": [], "best_val_acc": None, "reason": reason,
              "seed": budget.seed, "max_minutes": budget.max_minutes, "pinned": pinned or {}}
    path = output_dir / TUNE_DIR / (folder or strategy)
    path.mkdir(parents=True, exist_ok=True)
    (path / TUNING_FILE).write_text(json.dumps(record, indent=1))
    return record


def read_tunings(folder: str | Path) -> dict[str, dict]:
    """{strategy: tuning.json} of a comparison folder ({} for one that did not tune, or predates tuning). With
    several splits (tune/split<k>/<strategy>/) a strategy's record adds up its splits' costs and keeps each split's
    record under `per_split`."""
    found: dict[str, list[dict]] = {}
    for path in sorted(Path(folder).glob(f"{TUNE_DIR}/*/{TUNING_FILE}")) + \
            sorted(Path(folder).glob(f"{TUNE_DIR}/split*/*/{TUNING_FILE}")):
        record = json.loads(path.read_text())
        found.setdefault(record.get("strategy", path.parent.name), []).append(record)
    merged = {}
    for strategy, records in found.items():
        if len(records) == 1:
            merged[strategy] = records[0]
            continue
        records = sorted(records, key=lambda r: r.get("split_seed", 0))
        total = {key: round(sum(float(r.get(key) or 0.0) for r in records), 3)
                 for key in ("wall_seconds", "device_seconds", "extract_seconds")}
        merged[strategy] = records[0] | total | {
            "per_split": records, "run": sum(r["run"] for r in records), "pruned": sum(r["pruned"] for r in records),
            "failed": sum(r["failed"] for r in records), "trials": [t for r in records for t in r["trials"]],
            "chosen": {f"split{r.get('split_seed')}:{k}": v for r in records for k, v in r["chosen"].items()}}
    return merged


def extraction_seconds(tunings: dict[str, dict]) -> float:
    """Feature extraction the tunings paid (the head grid's train and val entries, an Optuna trial's miss): part of
    the one extraction every cache reader is charged, whoever paid it."""
    return sum(float(r.get("extract_seconds") or 0.0) for r in tunings.values())


def tuning_seconds(record: dict | None) -> float:
    """What a strategy's tuning cost in training time (device seconds; 0 when untuned)."""
    value = (record or {}).get("device_seconds")
    return float(value) if value is not None and math.isfinite(float(value)) else 0.0


def shown(chosen: dict) -> str:
    """The chosen configuration as a reader takes it in: floats to 3 significant digits (the runs get them whole)."""
    return " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in chosen.items())


def describe(record: dict) -> str:
    """One line: what a strategy's tuning tried, what it chose and what it cost."""
    if record["method"] == "untuned" or not record.get("chosen"):
        return f"tune {record['strategy']}: untuned ({record.get('reason', 'no search_space')})"
    chosen = shown(record["chosen"])
    best = record.get("best_val_acc")
    return (f"tune {record['strategy']} ({record['method']}): {record['run']} trials, {record['pruned']} pruned, "
            f"{record['failed']} failed; best val {best if best is None else f'{best:.4f}'} with {chosen}; "
            f"{record['wall_seconds']:.0f}s wall, {record['device_seconds']:.0f}s training"
            + (" (stopped by compare.tune.max_minutes)" if record.get("timed_out") else ""))
