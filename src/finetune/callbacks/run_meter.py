"""Measures what a run cost: fit wall time, training throughput (validation excluded; summed over DDP ranks) and
peak memory (this process's; rank 0's under DDP)."""

from __future__ import annotations

import resource
import sys
import time

import torch
from lightning import Callback


def _sync(module) -> None:
    if module.device.type == "cuda":
        torch.cuda.synchronize(module.device)


def reset_peak_memory(device: torch.device) -> None:
    """Start a fresh peak: CUDA's counter, or on Linux the process's VmHWM (so each run of a multirun is its own)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:  # not Linux, or not allowed: the peak stays the process's lifetime peak
        pass


def peak_memory_mb(device: torch.device) -> float:
    """CUDA max allocated on a GPU; the process's peak resident set size on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        with open("/proc/self/status") as handle:
            return next(int(line.split()[1]) for line in handle if line.startswith("VmHWM:")) / 2**10
    except (OSError, StopIteration):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


class RunMeter(Callback):
    def __init__(self):
        self.fit_seconds = 0.0
        self.train_seconds = 0.0
        self.train_samples = 0
        self.peak_memory_mb = 0.0

    def on_fit_start(self, trainer, module) -> None:
        reset_peak_memory(module.device)
        _sync(module)
        self._fit_start = time.perf_counter()
        self._epoch_start, self._validation_seconds = None, 0.0

    def on_train_epoch_start(self, trainer, module) -> None:
        _sync(module)
        self._epoch_start = time.perf_counter()
        self._validation_seconds = 0.0

    def on_validation_start(self, trainer, module) -> None:
        if trainer.sanity_checking or self._epoch_start is None:
            return
        _sync(module)
        self._validation_start = time.perf_counter()

    def on_validation_end(self, trainer, module) -> None:
        if trainer.sanity_checking or not hasattr(self, "_validation_start"):
            return
        _sync(module)
        self._validation_seconds += time.perf_counter() - self._validation_start
        del self._validation_start

    def on_validation_epoch_end(self, trainer, module) -> None:
        """Wall time since fit start beside each epoch's val metrics: the report's accuracy-against-time curves."""
        if not trainer.sanity_checking and hasattr(self, "_fit_start"):
            module.log("time/elapsed_seconds", time.perf_counter() - self._fit_start, rank_zero_only=True)

    def on_train_batch_start(self, trainer, module, batch, batch_idx: int) -> None:
        if self._epoch_start is None:  # a run resumed mid-epoch gets no on_train_epoch_start for that epoch
            self._epoch_start, self._validation_seconds = time.perf_counter(), 0.0

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx: int) -> None:
        self.train_samples += len(batch[-1])

    def on_train_epoch_end(self, trainer, module) -> None:
        if self._epoch_start is None:
            return
        _sync(module)
        self.train_seconds += time.perf_counter() - self._epoch_start - self._validation_seconds
        self._epoch_start = None

    def on_fit_end(self, trainer, module) -> None:
        _sync(module)
        self.fit_seconds = time.perf_counter() - self._fit_start
        self.peak_memory_mb = peak_memory_mb(module.device)
        if trainer.world_size > 1:  # throughput of the whole job: every rank's samples over the slowest rank's time
            counts = torch.tensor([float(self.train_samples), self.train_seconds], device=module.device)
            self.train_samples = int(trainer.strategy.reduce(counts[:1].clone(), reduce_op="sum").item())
            gathered = trainer.strategy.all_gather(counts[1:].clone())
            self.train_seconds = float(gathered.max())

    @property
    def train_samples_per_second(self) -> float:
        return self.train_samples / self.train_seconds if self.train_seconds else 0.0
