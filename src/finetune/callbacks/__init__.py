"""Callbacks that watch training: the freeze audit and the throughput/memory meter."""

from finetune.callbacks.freeze_audit import FreezeAudit, FreezeViolationError
from finetune.callbacks.numerics_guard import NonFiniteLossError, NonFiniteLossGuard
from finetune.callbacks.run_meter import RunMeter

__all__ = ["FreezeAudit", "FreezeViolationError", "NonFiniteLossError", "NonFiniteLossGuard", "RunMeter"]
