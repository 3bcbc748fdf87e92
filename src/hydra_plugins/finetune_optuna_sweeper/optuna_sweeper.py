"""hydra/sweeper=optuna: an Optuna (>= 4) search with the official hydra-optuna-sweeper's settings and parameter
syntax (storage, study_name, n_trials, n_jobs, direction, sampler, max_failure_rate, custom_search_space, params:
`tag(log, interval(a, b))`, `interval`, `choice`, `range`), plus what the official one cannot do on Optuna 2:

- pruning: each job gets its trial through its environment and finetune's TrialPruning callback reports to it; a
  pruned trial is told PRUNED (hydra.sweeper.pruner: median, hyperband, successive_halving, none);
- slots, not batches: n_jobs threads each launch one trial at a time, so a new trial starts as soon as one ends;
- one study, many workers: `storage` is a URL or a journal file (the default: optuna.journal in the sweep folder);
  every worker stops when the study holds n_trials finished trials; trials of a dead worker (its process gone on
  this host, or no heartbeat for grace_period seconds) are failed and asked again.
"""

# no `from __future__ import annotations`: Hydra executes plugin modules outside sys.modules, where dataclasses
# cannot resolve string annotations
import logging
import math
import os
import shlex
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional
from urllib.parse import urlparse

from hydra.core.config_store import ConfigStore
from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import MISSING, DictConfig, OmegaConf

log = logging.getLogger(__name__)

SAMPLERS = {"tpe": "optuna.samplers.TPESampler", "random": "optuna.samplers.RandomSampler",
            "cmaes": "optuna.samplers.CmaEsSampler", "nsgaii": "optuna.samplers.NSGAIISampler",
            "qmc": "optuna.samplers.QMCSampler"}
JOURNAL_FILE = "optuna.journal"
RESULTS_FILE = "optimization_results.yaml"
# trial user attributes this sweeper keeps: who runs it, when it was last seen alive, why it does not count
WORKER_ATTR, HEARTBEAT_ATTR, STALE_ATTR, NOT_RUN_ATTR = "worker", "heartbeat", "stale", "not_run"
RETRY_ATTR, RUN_DIR_ATTR = "retry_of", "run_dir"


@dataclass
class OptunaSweeperConf:
    _target_: str = "hydra_plugins.finetune_optuna_sweeper.optuna_sweeper.OptunaSweeper"
    # the sweeper builds sampler and pruner itself, so that a wrong one is one line naming the setting
    _recursive_: bool = False
    defaults: List[Any] = field(default_factory=lambda: [{"sampler": "tpe"}])
    # a mapping with an optuna.samplers `_target_` and its arguments (hydra/sweeper/sampler=tpe|random|...)
    sampler: Any = MISSING
    # minimize or maximize (the objective is the job's return value, finetune's optimized_metric)
    direction: Any = "minimize"
    # null: a journal file in the sweep folder; a file path: a journal file (NFS-safe lock); or an Optuna URL
    storage: Optional[str] = None
    # null: the job name; workers given one storage and study name share the study
    study_name: Optional[str] = None
    # finished trials the study should hold in all (over every worker)
    n_trials: int = 20
    # trials in flight in this worker (each its own job through the launcher)
    n_jobs: int = 1
    # seconds after which this worker asks no new trial (those in flight finish); null: no limit
    timeout: Optional[float] = None
    # parameter sets asked first when the study is new, e.g. [{optimizer.lr: 1e-3}] (the configured values)
    enqueue: Optional[Any] = None
    # stop this worker when more than this fraction of its trials failed
    max_failure_rate: float = 0.0
    search_space: Optional[Dict[str, Any]] = None
    # `module.function(cfg, trial)` that suggests further parameters (each becomes a job override)
    custom_search_space: Optional[str] = None
    params: Optional[Dict[str, str]] = None
    # median, hyperband, successive_halving, none, or a mapping with an optuna.pruners `_target_`
    pruner: Any = "none"
    # seconds between heartbeats of this worker's running trials, and without one before a trial counts as dead
    heartbeat_interval: int = 30
    grace_period: int = 120


ConfigStore.instance().store(group="hydra/sweeper", name="optuna", node=OptunaSweeperConf, provider="finetune")
for _name, _target in SAMPLERS.items():
    ConfigStore.instance().store(group="hydra/sweeper/sampler", name=_name, node={"_target_": _target, "seed": None},
                                 provider="finetune")


def config_error(message: str):
    from finetune.errors import ConfigError

    return ConfigError(message)


def distribution_from_override(override):
    """An Optuna distribution for a sweep override (choice, range, interval, tag(log, interval)); None for a fixed
    value. A range keeps Hydra's meaning: its stop is excluded."""
    from hydra.core.override_parser.types import Transformer
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    if not override.is_sweep_override():
        return None
    value = override.value()
    if override.is_choice_sweep() or (override.is_range_sweep() and value.shuffle):
        return CategoricalDistribution(list(override.sweep_iterator(transformer=Transformer.encode)))
    if override.is_range_sweep():
        values = list(override.sweep_iterator())
        if all(isinstance(v, int) for v in (value.start, value.stop, value.step)):
            return IntDistribution(values[0], values[-1], step=int(value.step))
        return FloatDistribution(values[0], values[-1], step=value.step)
    if override.is_interval_sweep():
        log_scale = "log" in value.tags
        if isinstance(value.start, int) and isinstance(value.end, int):
            return IntDistribution(value.start, value.end, log=log_scale)
        return FloatDistribution(value.start, value.end, log=log_scale)
    raise config_error(f"hydra.sweeper.params: {override.input_line} is not a choice, range or interval")


def search_space(arguments: List[str]):
    """(distributions, fixed overrides) from hydra.sweeper.params and the command line's overrides."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    distributions, fixed = {}, {}
    for override in OverridesParser.create().parse_overrides(arguments):
        name = override.get_key_element()
        distribution = distribution_from_override(override)
        if distribution is None:
            fixed[name] = override.input_line  # as typed, so `+key=value` and quoting survive
            distributions.pop(name, None)
        else:
            distributions[name] = distribution
            fixed.pop(name, None)
    return distributions, fixed


def storage_location(storage: Optional[str], sweep_dir: Path) -> str:
    """The storage the study lives in, checked before anything is written: a journal file's folder (or a SQLite
    file's) must exist and be writable."""
    if storage is None:
        sweep_dir.mkdir(parents=True, exist_ok=True)
        return str((sweep_dir / JOURNAL_FILE).resolve())
    if "://" in storage:
        url = urlparse(storage)
        if url.scheme != "sqlite":
            return storage
        path = Path(storage.split("sqlite:///", 1)[-1]) if storage.startswith("sqlite:///") else None
    else:
        path = Path(storage).expanduser().resolve()
    if path is not None:
        folder = path.parent
        if not folder.is_dir():
            raise config_error(f"hydra.sweeper.storage={storage}: the folder {folder} does not exist")
        if not os.access(folder, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
            raise config_error(f"hydra.sweeper.storage={storage}: {path if path.exists() else folder} is not "
                               f"writable")
    return storage if "://" in storage else str(path)


def counts_toward_n_trials(trial) -> bool:
    """Finished trials that count: complete, pruned, or failed by their job (not a dead worker's, not a surplus)."""
    from optuna.trial import TrialState

    if trial.state in (TrialState.COMPLETE, TrialState.PRUNED):
        return True
    return trial.state == TrialState.FAIL and not (trial.user_attrs.get(STALE_ATTR)
                                                   or trial.user_attrs.get(NOT_RUN_ATTR))


class OptunaSweeper(Sweeper):
    def __init__(self, sampler: Any, direction: Any, storage: Optional[str], study_name: Optional[str],
                 n_trials: int, n_jobs: int, max_failure_rate: float, search_space: Optional[Any],
                 custom_search_space: Optional[str], params: Optional[Any], pruner: Any = "none",
                 heartbeat_interval: int = 30, grace_period: int = 120, timeout: Optional[float] = None,
                 enqueue: Optional[Any] = None) -> None:
        self.timeout, self.enqueue = timeout, enqueue
        self._deadline = math.inf
        self.sampler_config, self.direction, self.storage = sampler, direction, storage
        self.study_name, self.n_trials, self.n_jobs = study_name, n_trials, n_jobs
        self.max_failure_rate, self.search_space_config = max_failure_rate, search_space
        self.custom_search_space, self.params, self.pruner = custom_search_space, params, pruner
        self.heartbeat_interval, self.grace_period = heartbeat_interval, grace_period
        self.config: Optional[DictConfig] = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._running: Dict[int, Any] = {}
        self._told = self._failed = 0
        self._timed_out = False
        self._last_failure: Optional[BaseException] = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context = config, hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(config=config, hydra_context=hydra_context,
                                                                task_function=task_function)

    # -- checks: everything a user can get wrong, before the study is created or touched

    def _checked(self, arguments: List[str]) -> dict:
        import optuna
        from hydra.utils import get_class, get_method

        from finetune.search.pruning import build_pruner, open_storage, pruner_spec

        if int(self.n_trials) < 1:
            raise config_error(f"hydra.sweeper.n_trials={self.n_trials}; it must be at least 1")
        if int(self.n_jobs) < 1:
            raise config_error(f"hydra.sweeper.n_jobs={self.n_jobs}; it must be at least 1")
        if not 0.0 <= float(self.max_failure_rate) <= 1.0:
            raise config_error(f"hydra.sweeper.max_failure_rate={self.max_failure_rate}; it must be in [0, 1]")
        if not isinstance(self.direction, str) or self.direction not in ("minimize", "maximize"):
            raise config_error(f"hydra.sweeper.direction={self.direction}; choose one of: minimize, maximize (one "
                               f"objective: optimized_metric)")
        if self.search_space_config:
            raise config_error("hydra.sweeper.search_space is the old syntax; write the parameters under "
                               "hydra.sweeper.params, e.g. optimizer.lr: tag(log, interval(1e-4, 1e-1))")
        if self.timeout is not None and (isinstance(self.timeout, bool) or not isinstance(self.timeout, (int, float))
                                         or not self.timeout > 0):
            raise config_error(f"hydra.sweeper.timeout={self.timeout}; give seconds above 0, or null for no limit")
        if not 0 < int(self.heartbeat_interval) < int(self.grace_period):
            raise config_error(f"hydra.sweeper.grace_period={self.grace_period} must exceed heartbeat_interval="
                               f"{self.heartbeat_interval} (> 0)")
        spec = pruner_spec(self.pruner)
        pruner = build_pruner(spec)
        target = (self.sampler_config or {}).get("_target_")
        try:
            sampler_class = get_class(str(target))
        except Exception:
            sampler_class = None
        if sampler_class is None or not issubclass(sampler_class, optuna.samplers.BaseSampler) or \
                issubclass(sampler_class, optuna.samplers.GridSampler):
            raise config_error(f"hydra.sweeper.sampler._target_={target}; choose one of: "
                               f"{', '.join(SAMPLERS.values())} (hydra/sweeper/sampler={'|'.join(SAMPLERS)})")
        from hydra.utils import instantiate

        try:
            sampler = instantiate(self.sampler_config)
        except Exception as err:
            raise config_error(f"hydra.sweeper.sampler: {target} refused its arguments "
                               f"({str(err).strip().splitlines()[-1]})") from None
        params = [f"{name}={value}" for name, value in (self.params or {}).items()]
        distributions, fixed = search_space([*params, *arguments])
        extender = get_method(self.custom_search_space) if self.custom_search_space else None
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        storage_url = storage_location(self.storage, sweep_dir)
        study_name = self.study_name or str(self.config.hydra.job.name)
        try:
            storage = open_storage(storage_url)
        except Exception as err:
            raise config_error(f"hydra.sweeper.storage={storage_url}: {str(err).strip().splitlines()[0]}") from None
        try:
            study_id = storage.get_study_id_from_name(study_name)
        except KeyError:
            study_id = None
        if study_id is not None:
            existing = [d.name.lower() for d in storage.get_study_directions(study_id)]
            if existing != [self.direction]:
                raise config_error(f"hydra.sweeper.direction={self.direction}, but study '{study_name}' in "
                                   f"{storage_url} was created to {' and '.join(existing)}; use another "
                                   f"hydra.sweeper.study_name or direction={existing[0]}")
        return dict(spec=spec, pruner=pruner, sampler=sampler, distributions=distributions, fixed=fixed,
                    extender=extender, storage_url=storage_url, storage=storage, study_name=study_name,
                    sweep_dir=sweep_dir)

    # -- the search

    def sweep(self, arguments: List[str]) -> None:
        import optuna
        from hydra._internal.core_plugins.basic_launcher import BasicLauncher

        from finetune.search.pruning import PRUNER_ATTR
        from finetune.errors import ConfigError

        try:
            search = self._checked(arguments)
        except ConfigError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)
        self.search = search
        if self.timeout is not None:
            self._deadline = time.monotonic() + float(self.timeout)
        study = optuna.create_study(study_name=search["study_name"], storage=search["storage"],
                                    sampler=search["sampler"], pruner=search["pruner"], direction=self.direction,
                                    load_if_exists=True)
        self.study = study
        study.set_user_attr(PRUNER_ATTR, search["spec"])
        if self.enqueue and not study.get_trials(deepcopy=False):
            for params in OmegaConf.to_container(OmegaConf.create(list(self.enqueue))):
                study.enqueue_trial(dict(params), skip_if_exists=True)
        self._fail_dead_trials()
        slots = int(self.n_jobs)
        if slots > 1 and isinstance(self.launcher, BasicLauncher):
            log.warning("hydra.sweeper.n_jobs=%d: the basic launcher runs jobs in this process, one at a time; use "
                        "hydra/launcher=local_processes (or slurm) for trials in parallel", slots)
            slots = 1
        finished = sum(map(counts_toward_n_trials, study.get_trials(deepcopy=False)))
        print(f"study '{study.study_name}' in {search['storage_url']}: {finished} of {self.n_trials} trials "
              f"finished; {slots} in flight here (sampler {type(search['sampler']).__name__}, pruner "
              f"{type(search['pruner']).__name__})", flush=True)
        heartbeat = threading.Thread(target=self._beat, name="optuna-heartbeat", daemon=True)
        heartbeat.start()
        workers = [threading.Thread(target=self._run_slot, name=f"optuna-slot-{i}") for i in range(slots)]
        try:
            for worker in workers:
                worker.start()
            for worker in workers:
                worker.join()
        finally:
            self._stop.set()
            heartbeat.join(timeout=5)
        self._write_results()
        if self._told and self._failed / self._told > float(self.max_failure_rate):
            log.error("Failed %d times out of %d with max_failure_rate=%s", self._failed, self._told,
                      self.max_failure_rate)
            raise self._last_failure or RuntimeError("too many failed trials")

    def _run_slot(self) -> None:
        import optuna

        try:
            while not self._stop.is_set():
                with self._lock:
                    trials = self.study.get_trials(deepcopy=False)
                    finished = sum(map(counts_toward_n_trials, trials))
                    running = [t for t in trials if t.state == optuna.trial.TrialState.RUNNING]
                    action = self._slot_action(finished, len(running))
                    if action == "done":
                        return
                    if action == "stop":
                        if not self._timed_out:
                            self._timed_out = True
                            log.info("hydra.sweeper.timeout=%ss reached: no new trial (%d finished)",
                                     self.timeout, finished)
                        return
                    trial = self._ask() if action == "ask" else None
                if trial is None:  # the rest are in flight (here or in other workers): wait for them, or their death
                    self._stop.wait(min(1.0, self.heartbeat_interval))
                    with self._lock:
                        self._fail_dead_trials()
                    continue
                self._run_trial(trial)
        except BaseException as err:  # a slot that dies must not leave the others waiting for its trial
            log.exception("optuna slot failed")
            self._last_failure = err
            self._failed = self._told = max(self._told, 1)
            self._stop.set()

    def _slot_action(self, finished: int, in_flight: int) -> str:
        """What a free slot does next: "done" (n_trials finished), "wait" (the rest are in flight, so the deadline
        denies no trial and the study is not cut short), "stop" (the deadline passed before a trial still to be
        asked) or "ask"."""
        if finished >= self.n_trials:
            return "done"
        if finished + in_flight >= self.n_trials:
            return "wait"
        return "stop" if time.monotonic() >= self._deadline else "ask"

    def _ask(self):
        """The next trial, or None (and the trial withdrawn) when other workers claimed the last ones meanwhile."""
        import optuna

        trial = self.study.ask(self.search["distributions"])
        # the heartbeat before the worker: a worker that reads the trial between the two writes skips it (no worker
        # yet) instead of finding a worker without a heartbeat, silent since 1970, and failing a trial just asked
        trial.set_user_attr(HEARTBEAT_ATTR, time.time())
        trial.set_user_attr(WORKER_ATTR, f"{socket.gethostname()}:{os.getpid()}")
        if self.search["extender"] is not None:
            self.search["extender"](self.config, trial)
        earlier = [t for t in self.study.get_trials(deepcopy=False) if t.number < trial.number and (
            counts_toward_n_trials(t) or (t.state == optuna.trial.TrialState.RUNNING
                                          and not t.user_attrs.get(STALE_ATTR)))]
        if len(earlier) >= self.n_trials:
            trial.set_user_attr(NOT_RUN_ATTR, f"the study already had {self.n_trials} trials")
            self.study.tell(trial, state=optuna.trial.TrialState.FAIL)
            return None
        return trial

    def _overrides(self, trial) -> List[str]:
        from finetune.search.pruning import STORAGE_ENV, STUDY_ENV, TRIAL_ID_ENV

        def quoted(value) -> str:
            return "'" + str(value).replace("\\", "\\\\").replace("'", "\\'") + "'"

        overrides = [f"{name}={value}" for name, value in trial.params.items()]
        overrides += [line for name, line in self.search["fixed"].items() if name not in trial.params]
        # the trial reaches the job (and its DDP ranks, or its SLURM task) through the job's environment
        environment = {STORAGE_ENV: self.search["storage_url"], STUDY_ENV: self.study.study_name,
                       TRIAL_ID_ENV: trial._trial_id}
        return overrides + [f"++hydra.job.env_set.{name}={quoted(value)}" for name, value in environment.items()]

    def _run_trial(self, trial) -> None:
        self._running[trial._trial_id] = trial
        log.info("trial %d: %s", trial.number, " ".join(f"{k}={v}" for k, v in trial.params.items()))
        try:
            returns = self.launcher.launch([self._overrides(trial)], initial_job_idx=trial.number)
            outcome, run_dir = returns[0], self._run_dir(returns[0])
        except Exception as err:  # the launcher itself failed: the trial failed, the study goes on
            log.exception("trial %d could not be launched", trial.number)
            outcome, run_dir = err, None
        finally:
            self._running.pop(trial._trial_id, None)
        with self._lock:
            self._tell(trial, outcome, run_dir)

    @staticmethod
    def _run_dir(job_return) -> Optional[str]:
        hydra_cfg = job_return.hydra_cfg
        output_dir = OmegaConf.select(hydra_cfg, "hydra.runtime.output_dir") if hydra_cfg is not None else None
        return str(output_dir) if output_dir else job_return.working_dir

    def _tell(self, trial, outcome, run_dir: Optional[str]) -> None:
        import optuna

        from finetune.search.pruning import PRUNED_ATTR

        TrialState = optuna.trial.TrialState
        frozen = self.study._storage.get_trial(trial._trial_id)  # the job may have written to it (read on 5.1)
        if frozen.state != TrialState.RUNNING:
            log.warning("trial %d is already %s (a resumed worker took it for dead); its outcome is not told",
                        trial.number, frozen.state.name)
            return
        if run_dir is not None:
            trial.set_user_attr(RUN_DIR_ATTR, run_dir)
        self._told += 1
        if PRUNED_ATTR in frozen.user_attrs:
            self.study.tell(trial, state=TrialState.PRUNED)
            log.info("trial %d pruned after epoch %d", trial.number, frozen.user_attrs[PRUNED_ATTR])
            return
        try:
            if isinstance(outcome, BaseException):
                raise outcome
            try:
                value = float(outcome.return_value)
            except (ValueError, TypeError):
                raise ValueError(f"Return value must be float-castable. Got '{outcome.return_value}'.") from None
            if not math.isfinite(value):
                raise ValueError(f"Return value must be finite. Got '{value}'.")
        except Exception as err:
            self.study.tell(trial, state=TrialState.FAIL)
            log.warning("Failed experiment: %s", err)
            self._failed += 1
            self._last_failure = err
            if self._failed / self._told > float(self.max_failure_rate):
                self._stop.set()
            return
        self.study.tell(trial, value)

    # -- many workers: heartbeats, dead trials, the summary

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_interval):
            for trial_id in list(self._running):
                try:
                    self.study._storage.set_trial_user_attr(trial_id, HEARTBEAT_ATTR, time.time())
                except Exception as err:  # finished meanwhile, or the storage hiccupped: the next beat retries
                    log.debug("heartbeat of trial id %d: %s", trial_id, err)

    def _fail_dead_trials(self) -> None:
        """Fail the RUNNING trials whose worker is dead (its process gone on this host, or silent for
        grace_period seconds) and enqueue their parameters, so the study asks them again."""
        import optuna

        from finetune.run.processes import process_alive

        storage, now, host = self.study._storage, time.time(), socket.gethostname()
        for trial in self.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            worker = trial.user_attrs.get(WORKER_ATTR)
            if worker is None:
                continue
            worker_host, _, pid = worker.rpartition(":")
            last_sign = trial.user_attrs.get(HEARTBEAT_ATTR)
            if last_sign is None:  # written by an older worker in the other order: alive since it was asked
                last_sign = trial.datetime_start.timestamp() if trial.datetime_start else now
            silent = now - float(last_sign) > self.grace_period
            if not silent and not (worker_host == host and not process_alive(int(pid))):
                continue
            try:
                storage.set_trial_user_attr(trial._trial_id, STALE_ATTR, True)
                storage.set_trial_state_values(trial._trial_id, state=optuna.trial.TrialState.FAIL)
            except optuna.exceptions.UpdateFinishedTrialError:
                continue  # another worker got there first, and asks it again
            self.study.enqueue_trial(trial.params, user_attrs={RETRY_ATTR: trial.number})
            log.warning("trial %d was running in a dead worker (%s): failed, and asked again", trial.number, worker)

    def resume_command(self) -> str:
        program = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python -m finetune.train"
        # as typed: hydra.sweep.subdir=trial${hydra.job.num} must not be resolved here
        words = [*OmegaConf.to_container(self.config.hydra.overrides.task, resolve=False),
                 *OmegaConf.to_container(self.config.hydra.overrides.hydra, resolve=False)]
        if self.storage is None and not any(w.startswith("hydra.sweep.dir=") for w in words):
            words.append(f"hydra.sweep.dir={self.search['sweep_dir'].resolve()}")
        return " ".join([program, "-m", *map(shlex.quote, words)])

    def _write_results(self) -> None:
        from collections import Counter

        from optuna.trial import TrialState

        trials = self.study.get_trials(deepcopy=False)
        complete = [t for t in trials if t.state == TrialState.COMPLETE]
        best = None
        if complete:
            best = (max if self.direction == "maximize" else min)(complete, key=lambda t: t.value)
        results = {"name": "optuna", "best_params": dict(best.params) if best else {},
                   "best_value": best.value if best else None,
                   "best_run": best.user_attrs.get(RUN_DIR_ATTR) if best else None,
                   "study_name": self.study.study_name, "storage": self.search["storage_url"],
                   "finished": sum(map(counts_toward_n_trials, trials)),
                   "states": dict(Counter(t.state.name for t in trials if counts_toward_n_trials(t))),
                   "timed_out": self._timed_out,
                   "resume": self.resume_command()}
        sweep_dir = self.search["sweep_dir"]
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(OmegaConf.create(results), sweep_dir / RESULTS_FILE)
        print(f"study '{self.study.study_name}' in {self.search['storage_url']}: {results['finished']} of "
              f"{self.n_trials} trials finished {results['states']}\nresume it, or add a worker: "
              f"{results['resume']}", flush=True)


OFFICIAL_MODULE = "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper"


class OfficialOptunaSweeper(OptunaSweeper):
    """This sweeper under the official plugin's class name, so that a YAML naming
    `_target_: hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper` runs unchanged."""


def answer_to_the_official_name() -> None:
    """Hydra (1.3.8) finds a plugin by `__module__.__qualname__` among the classes in hydra_plugins and then imports
    that dotted path: give OfficialOptunaSweeper the official name and, unless the official plugin is installed
    (then it keeps its name), a module under that name in sys.modules, rather than a file that would clash with it."""
    import importlib.util
    import types

    import hydra_plugins

    OfficialOptunaSweeper.__module__ = OFFICIAL_MODULE
    OfficialOptunaSweeper.__name__ = OfficialOptunaSweeper.__qualname__ = "OptunaSweeper"
    package_name = OFFICIAL_MODULE.rsplit(".", 1)[0]
    if package_name in sys.modules or importlib.util.find_spec(package_name) is not None:
        return
    package, module = types.ModuleType(package_name, __doc__), types.ModuleType(OFFICIAL_MODULE, __doc__)
    package.__path__ = []
    module.OptunaSweeper, package.optuna_sweeper = OfficialOptunaSweeper, module
    sys.modules[package_name], sys.modules[OFFICIAL_MODULE] = package, module
    setattr(hydra_plugins, package_name.rsplit(".", 1)[1], package)


answer_to_the_official_name()
