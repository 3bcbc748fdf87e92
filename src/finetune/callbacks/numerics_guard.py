"""Stops a run at the first non-finite training loss, before a checkpoint can store the damaged weights.

The check stays on the device (no per-step synchronisation): the first bad step and its loss are recorded there,
and read every `check_every_n_steps`, before every step on which a checkpoint may be written, and at each epoch
end. Lightning runs ModelCheckpoint after all other callbacks, so the last good checkpoint is never overwritten.
"""

from __future__ import annotations

import torch
from lightning import Callback
from lightning.pytorch.callbacks import ModelCheckpoint

from finetune.errors import ConfigError
from finetune.run.lightning_internals import checkpoint_every_n_train_steps


class NonFiniteLossError(ConfigError):
    pass


NONE = 2**62  # "no bad step" in the cross-rank minimum


def first_bad_step_of_all_ranks(first_bad_step: torch.Tensor) -> int:
    """The earliest bad step any rank saw (-1: none), by one all-reduce of an int64."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return int(first_bad_step)
    encoded = torch.where(first_bad_step < 0, torch.full_like(first_bad_step, NONE), first_bad_step)
    dist.all_reduce(encoded, op=dist.ReduceOp.MIN)
    step = int(encoded)
    return -1 if step == NONE else step


class NonFiniteLossGuard(Callback):
    def __init__(self, check_every_n_steps: int = 10):
        self.check_every_n_steps = max(int(check_every_n_steps), 1)

    def on_train_start(self, trainer, module) -> None:
        self.first_bad_step = torch.full((), -1, dtype=torch.long, device=module.device)
        self.first_bad_loss = torch.zeros((), dtype=torch.float32, device=module.device)
        self.checkpoint_every = [checkpoint_every_n_train_steps(c) for c in trainer.callbacks
                                 if isinstance(c, ModelCheckpoint) and checkpoint_every_n_train_steps(c)]

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx: int) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is None:
            return
        step = trainer.global_step  # optimizer steps taken, this batch's included
        newly_bad = ~torch.isfinite(loss.detach()) & (self.first_bad_step < 0)
        self.first_bad_step = torch.where(newly_bad, step, self.first_bad_step)
        self.first_bad_loss = torch.where(newly_bad, loss.detach().float(), self.first_bad_loss)
        if step % self.check_every_n_steps == 0 or any(step % every == 0 for every in self.checkpoint_every):
            self.check(trainer)

    def on_train_epoch_end(self, trainer, module) -> None:
        self.check(trainer)

    def on_validation_start(self, trainer, module) -> None:
        if hasattr(self, "first_bad_step"):
            self.check(trainer)

    def check(self, trainer) -> None:
        """Every rank checks at the same steps; under DDP the first bad step is reduced across ranks first, so that
        all stop together (a rank stopping alone leaves the others waiting in their next all-reduce)."""
        local = int(self.first_bad_step)
        step = first_bad_step_of_all_ranks(self.first_bad_step) if trainer.world_size > 1 else local
        if step < 0:
            return
        saved = [c.last_model_path for c in trainer.checkpoint_callbacks if c.last_model_path]
        saved += [c.best_model_path for c in trainer.checkpoint_callbacks if c.best_model_path]
        last_good = saved[0] if saved else ""
        value = float(self.first_bad_loss) if local == step else "non-finite on another rank"
        raise NonFiniteLossError(
            f"training loss became {value} at step {step} (epoch {trainer.current_epoch}); "
            f"last good checkpoint: {last_good or 'none yet'}; try a lower optimizer.lr, "
            f"trainer.gradient_clip_val=1.0, or trainer.precision=32-true")
