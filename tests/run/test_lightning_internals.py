"""The private Lightning attributes finetune/run/lightning_internals.py relies on still exist, with the types it uses.
When one fails, re-read that part of the installed Lightning (checked on 2.6) and update lightning_internals.py; what
each one does is pinned by behaviour elsewhere (tests/callbacks/test_metrics.py: the step loss; tests/run/test_checkpoints.py:
last.ckpt; tests/run/test_resume.py and tests/data/test_image_store.py: the batches skipped after a restart; tests/run/test_ddp.py:
a staged strategy under DDP)."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import DDPStrategy

from finetune.run import lightning_internals as internals

WHERE = f"(lightning {L.__version__}; finetune/run/lightning_internals.py was checked on {internals.CHECKED_ON})"


def test_the_logger_connector_still_says_when_a_step_is_logged():
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    assert hasattr(trainer, "_logger_connector"), f"Trainer._logger_connector is gone {WHERE}"
    assert isinstance(internals.should_update_logs(trainer), bool), f"should_update_logs changed {WHERE}"


def test_ddp_still_keeps_its_keyword_arguments_until_it_wraps():
    strategy = DDPStrategy()
    assert isinstance(getattr(strategy, "_ddp_kwargs", None), dict), f"DDPStrategy._ddp_kwargs is gone {WHERE}"
    internals.find_unused_parameters(strategy)
    assert strategy._ddp_kwargs["find_unused_parameters"] is True


def test_model_checkpoint_still_has_what_last_checkpoint_uses():
    callback = ModelCheckpoint(every_n_train_steps=3)
    assert internals.checkpoint_every_n_train_steps(callback) == 3, f"ModelCheckpoint._every_n_train_steps {WHERE}"
    assert isinstance(internals.last_saved_step(callback), int), f"ModelCheckpoint._last_global_step_saved {WHERE}"
    for method in ("_save_last_checkpoint", "_monitor_candidates"):
        assert callable(getattr(callback, method, None)), f"ModelCheckpoint.{method} is gone {WHERE}"


def test_the_fit_loop_still_counts_the_batches_of_the_epoch():
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    assert internals.batches_done(trainer) == 0, f"fit_loop.epoch_loop.batch_progress.current.ready {WHERE}"
    assert internals.batches_done(None) == 0


def test_a_module_and_the_wandb_logger_still_hold_what_we_read(tmp_path):
    import pytest

    assert internals.attached_trainer(L.LightningModule()) is None, f"LightningModule._trainer {WHERE}"
    pytest.importorskip("wandb")
    from lightning.pytorch.loggers import WandbLogger

    logger = WandbLogger(offline=True, save_dir=str(tmp_path), project="finetune-internals")
    assert internals.wandb_run_started(logger) is False, f"WandbLogger._experiment {WHERE}"
