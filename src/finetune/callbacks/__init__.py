"""Callbacks that watch training: the freeze audit, the throughput/memory meter, the NaN guard, last.ckpt."""

from finetune.callbacks.freeze_audit import FreezeAudit, FreezeViolationError
from finetune.callbacks.last_checkpoint import LastCheckpoint
from finetune.callbacks.numerics_guard import NonFiniteLossError, NonFiniteLossGuard
from finetune.callbacks.run_meter import RunMeter

__all__ = ["FreezeAudit", "FreezeViolationError", "LastCheckpoint", "NonFiniteLossError", "NonFiniteLossGuard", "RunMeter"]
