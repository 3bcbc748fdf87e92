"""Pruning of an Optuna trial from inside its training job: after every validation, rank 0 reports the optimized
metric to the trial and asks the study's pruner; the decision is broadcast so that every DDP rank stops together.

The sweeper (hydra/sweeper=optuna, src/hydra_plugins/finetune_optuna_sweeper) hands the trial to the job through
the job's environment (hydra.job.env_set), so this works alike in-process, in a local process, on a DDP rank 0 and in
a SLURM task. A pruned run ends cleanly: its folder holds pruned.json, its trial carries the user attribute
`pruned_at_epoch`, and the sweeper tells Optuna the trial was PRUNED (not failed).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import lightning as L

from finetune.errors import ConfigError
from finetune.run.folders import PRUNED_FILE

log = logging.getLogger("finetune")

STORAGE_ENV = "FINETUNE_OPTUNA_STORAGE"
STUDY_ENV = "FINETUNE_OPTUNA_STUDY"
TRIAL_ID_ENV = "FINETUNE_OPTUNA_TRIAL_ID"
PRUNED_ATTR = "pruned_at_epoch"
# the study's user attribute that holds its pruner, so that every job and worker prunes alike
PRUNER_ATTR = "pruner"
PRUNERS = {"median": "optuna.pruners.MedianPruner", "hyperband": "optuna.pruners.HyperbandPruner",
           "successive_halving": "optuna.pruners.SuccessiveHalvingPruner", "none": "optuna.pruners.NopPruner"}


def open_storage(storage: str):
    """An Optuna storage from a URL (sqlite:///..., postgresql://...) or a file path, which becomes a JournalStorage
    file whose lock (O_EXCL open of a lock file) works on NFSv3 and later."""
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock, JournalStorage

    if "://" in storage:
        return optuna.storages.RDBStorage(storage)
    return JournalStorage(JournalFileBackend(storage, lock_obj=JournalFileOpenLock(storage)))


def pruner_spec(pruner) -> dict:
    """hydra.sweeper.pruner as a plain mapping with `_target_`: a name (median, hyperband, successive_halving,
    none) or a mapping with an optuna.pruners `_target_` and its arguments."""
    from omegaconf import DictConfig, OmegaConf

    if pruner is None:
        pruner = "none"
    if isinstance(pruner, str):
        if pruner not in PRUNERS:
            raise ConfigError(f"hydra.sweeper.pruner={pruner!r}; choose one of: {', '.join(PRUNERS)}")
        return {"_target_": PRUNERS[pruner]}
    spec = OmegaConf.to_container(pruner, resolve=True) if isinstance(pruner, DictConfig) else dict(pruner)
    if spec.get("_target_") not in PRUNERS.values():
        raise ConfigError(f"hydra.sweeper.pruner._target_={spec.get('_target_')!r}; choose one of: "
                          f"{', '.join(PRUNERS.values())} (or a name: {', '.join(PRUNERS)})")
    return spec


def build_pruner(spec: dict):
    from hydra.utils import instantiate

    try:
        return instantiate(spec)
    except Exception as err:
        raise ConfigError(f"hydra.sweeper.pruner: {spec['_target_']} refused its arguments "
                          f"({str(err).strip().splitlines()[-1]})") from None


def trial_callbacks(monitor: str, output_dir: str | Path) -> list:
    """[TrialPruning] when this job is a trial of an Optuna sweep (its environment names one), else []."""
    if not os.environ.get(TRIAL_ID_ENV):
        return []
    return [TrialPruning(monitor=monitor, output_dir=output_dir)]


class TrialPruning(L.Callback):
    """Reports `monitor` (the sweep's optimized_metric) to this job's trial after every validation, per epoch, and
    stops training when the study's pruner says so, or when the trial is no longer running (a resumed sweep failed
    it because its worker had died)."""

    def __init__(self, monitor: str = "val/acc", output_dir: str | Path = ".") -> None:
        self.monitor, self.output_dir = monitor, Path(output_dir)
        self.trial = None
        self.pruned_at_epoch: int | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or self.trial is not None or not trainer.is_global_zero:
            return
        import optuna

        storage = open_storage(os.environ[STORAGE_ENV])
        study = optuna.load_study(study_name=os.environ[STUDY_ENV], storage=storage)
        study.pruner = build_pruner(study.user_attrs.get(PRUNER_ATTR, {"_target_": PRUNERS["none"]}))
        self.trial = optuna.trial.Trial(study, int(os.environ[TRIAL_ID_ENV]))

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        reason = self._decide(trainer) if trainer.is_global_zero else None
        # every rank stops together: rank 0 decides, the others follow
        reason = trainer.strategy.broadcast(reason, src=0)
        if reason is not None:
            trainer.should_stop = True
            self.pruned_at_epoch = trainer.current_epoch

    def _decide(self, trainer: L.Trainer) -> str | None:
        import optuna

        trial = self.trial
        state = trial.study._storage.get_trial(trial._trial_id).state  # read on optuna 5.1
        if state != optuna.trial.TrialState.RUNNING:
            log.warning("trial %d is %s (its sweep worker died and a resumed sweep failed it): stopping",
                        trial.number, state.name)
            return f"trial is {state.name}"
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            return None
        value, epoch = float(value), trainer.current_epoch
        trial.report(value, step=epoch)
        if not trial.should_prune():
            return None
        trial.set_user_attr(PRUNED_ATTR, epoch)
        record = {"trial": trial.number, "epoch": epoch, "metric": self.monitor, "value": value,
                  "pruner": type(trial.study.pruner).__name__}
        self.output_dir.mkdir(parents=True, exist_ok=True)
        (self.output_dir / PRUNED_FILE).write_text(json.dumps(record, indent=1))
        log.info("trial %d pruned after epoch %d (%s=%.4f, %s)", trial.number, epoch, self.monitor, value,
                 record["pruner"])
        return "pruned"
