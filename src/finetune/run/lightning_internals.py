"""Every place this project reads or writes a private Lightning attribute, in one file. Lightning offers no public
way to do these; each was read on the installed source of Lightning 2.6 (2.6.6), and
tests/run/test_lightning_internals.py fails loudly, naming the attribute, when a Lightning release moves one."""

from __future__ import annotations

CHECKED_ON = "2.6"


def should_update_logs(trainer) -> bool:
    """Whether this training step is one Lightning writes to the loggers (log_every_n_steps, counted by its own
    `_batches_that_stepped`): the step loss is logged only then (each self.log costs milliseconds)."""
    return trainer._logger_connector.should_update_logs


def find_unused_parameters(strategy) -> None:
    """Make DDP tolerate parameters without a gradient (parts a staged strategy unfreezes later). DDPStrategy keeps
    the keyword arguments it passes to DistributedDataParallel in `_ddp_kwargs` until it wraps the model."""
    kwargs = getattr(strategy, "_ddp_kwargs", None)
    if isinstance(kwargs, dict):
        kwargs["find_unused_parameters"] = True


def checkpoint_every_n_train_steps(callback) -> int | None:
    """A ModelCheckpoint's every_n_train_steps (stored only as `_every_n_train_steps`)."""
    return callback._every_n_train_steps


def last_saved_step(callback) -> int:
    """The global step a ModelCheckpoint last wrote at (`_last_global_step_saved`)."""
    return callback._last_global_step_saved


def save_last(callback, trainer) -> None:
    """Write the callback's last.ckpt now, with the metrics Lightning would give it (`_save_last_checkpoint`,
    `_monitor_candidates`)."""
    callback._save_last_checkpoint(trainer, callback._monitor_candidates(trainer))


def batches_done(trainer) -> int:
    """How many training batches of the current epoch were already stepped: after a mid-epoch restart, what
    Lightning restored from the checkpoint (`fit_loop.epoch_loop.batch_progress`, public attributes but no
    documented API), else 0."""
    return trainer.fit_loop.epoch_loop.batch_progress.current.ready if trainer is not None else 0


def attached_trainer(module):
    """The module's Trainer, or None when it has none: LightningModule.trainer raises then, `_trainer` does not."""
    return module._trainer


def wandb_run_started(logger) -> bool:
    """Whether a WandbLogger has started its run (`_experiment`): reading `.experiment` would start one."""
    return logger._experiment is not None
