"""last.ckpt that is always the latest state: written at the end of every training epoch, every
`every_n_train_steps` optimizer steps when set, and when training ends.

Lightning 2.6's ModelCheckpoint(save_last=True) with a monitored metric writes last.ckpt only when it writes a top-k
checkpoint, i.e. when the metric improved: a run whose best epoch was 5 of 10 would leave an epoch-5 last.ckpt, and
resuming would silently redo epochs. The best checkpoint stays with the monitored ModelCheckpoint; this one has no
monitor and keeps no top-k, only last.ckpt (tests/run/test_checkpoints.py pins the behaviour on the installed Lightning).
"""

from __future__ import annotations

from lightning.pytorch.callbacks import ModelCheckpoint

from finetune.run.lightning_internals import checkpoint_every_n_train_steps, last_saved_step, save_last


class LastCheckpoint(ModelCheckpoint):
    def __init__(self, dirpath: str | None = None, every_n_train_steps: int | None = None):
        super().__init__(dirpath=dirpath, monitor=None, save_top_k=0, save_last=True,
                         every_n_train_steps=every_n_train_steps, save_on_train_epoch_end=True)

    def _writes_now(self, trainer) -> bool:
        return not (trainer.fast_dev_run or trainer.sanity_checking or trainer.state.fn != "fit")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        every = checkpoint_every_n_train_steps(self)
        if every and trainer.global_step % every == 0 and last_saved_step(self) != trainer.global_step \
                and self._writes_now(trainer):
            save_last(self, trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        # also when a step checkpoint was just written at this global step: the epoch's end is a later state
        if self._writes_now(trainer):
            save_last(self, trainer)

    def on_validation_end(self, trainer, pl_module) -> None:
        """Validation writes nothing here: the epoch's end follows it."""
