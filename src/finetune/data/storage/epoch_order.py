"""The order of a head epoch over a memory-mapped entry, and whether the entry fits in the job's memory.

A full shuffle reads rows at random from the whole entry: when the entry is larger than the memory the job may use
(its cgroup limit), every row faults in pages that are evicted before they are used again and the epoch reads the
disk many times over. The windowed order reads it about once: the entry is cut into blocks of consecutive rows, the
blocks are visited in a seeded order, `window_blocks` at a time, and the rows of a window are shuffled among
themselves. Still a function of (seed, epoch) only, so a resumed run skips exactly the batches it stepped, and ranks
take every world-th row of it (DistributedSampler's rule), so a window's pages are shared by the ranks of a node.

What it costs: a batch mixes rows of one window (random blocks from anywhere in the entry), not of the whole split.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from finetune.data.base import IndexBatchSampler
from finetune.errors import ConfigError

EPOCH_ORDERS = ("auto", "shuffle", "window")
BLOCK_BYTES = 4 * 2**20  # rows read together: large enough for readahead, small enough for many blocks a window
# an entry fits when it takes at most this share of the memory the job has left, and a window takes this share
HEADROOM_SHARE = 0.5


def cgroup_memory_limit(proc_cgroup: str = "/proc/self/cgroup", root: str = "/sys/fs/cgroup") -> int | None:
    """The smallest memory limit on this process' cgroup path (v2 `memory.max`, v1 `memory.limit_in_bytes`), or
    None when no limit is set or cgroups cannot be read."""
    try:
        lines = Path(proc_cgroup).read_text().splitlines()
    except OSError:
        return None
    limits = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            base, name = Path(root), "memory.max"
        elif "memory" in controllers.split(","):
            base, name = Path(root) / "memory", "memory.limit_in_bytes"
        else:
            continue
        folder = base / path.lstrip("/")
        while True:  # a limit on any ancestor binds too
            try:
                value = (folder / name).read_text().strip()
                if value.isdigit() and int(value) < 2**62:
                    limits.append(int(value))
            except OSError:
                pass
            if folder == base or base not in folder.parents:
                break
            folder = folder.parent
    return min(limits) if limits else None


def status_bytes(field: str, path: str = "/proc/self/status") -> int:
    with open(path) as handle:
        return next(int(line.split()[1]) * 1024 for line in handle if line.startswith(f"{field}:"))


def memory_headroom_bytes() -> int:
    """What the page cache of this job can still hold: its cgroup's limit (a SLURM or Kubernetes job) less what the
    process already holds (its RSS: tensors, and the libraries' mapped files, which count against the limit too),
    and never more than the machine has available."""
    available = status_bytes("MemAvailable", "/proc/meminfo")
    limit = cgroup_memory_limit()
    return min(limit - status_bytes("VmRSS"), available) if limit else available


def check_epoch_order(epoch_order: str) -> str:
    if epoch_order not in EPOCH_ORDERS:
        raise ConfigError(f"strategy.epoch_order={epoch_order!r}; choose one of: {', '.join(EPOCH_ORDERS)}")
    return epoch_order


def choose_window(epoch_order: str, entry_bytes: int, rows: int, window_bytes: int | None,
                  headroom_bytes: int | None = None, processes: int = 1) -> tuple[int, int] | None:
    """(block_rows, window_blocks) for a windowed epoch, or None for a full shuffle. `auto` shuffles fully when the
    entry fits in half the job's memory headroom, else windows half of it (or `window_bytes`), shared by the
    `processes` of the node that each hold a window in RAM (its ranks)."""
    check_epoch_order(epoch_order)
    headroom_bytes = headroom_bytes or memory_headroom_bytes()
    if epoch_order == "shuffle" or (epoch_order == "auto" and entry_bytes <= HEADROOM_SHARE * headroom_bytes):
        return None
    row_bytes = max(entry_bytes // max(rows, 1), 1)
    block_rows = max(1, BLOCK_BYTES // row_bytes)
    window = window_bytes or int(HEADROOM_SHARE * max(headroom_bytes, 0) / max(processes, 1))
    return block_rows, max(1, window // (block_rows * row_bytes))


def block_order(rows: int, block_rows: int, generator: torch.Generator) -> torch.Tensor:
    """The order in which an epoch visits the blocks (block b: rows [b * block_rows, (b + 1) * block_rows)): the
    generator's first draw, so a reader can know an epoch's windows without drawing its rows."""
    return torch.randperm(math.ceil(rows / block_rows), generator=generator)


def windowed_order(rows: int, block_rows: int, window_blocks: int, generator: torch.Generator) -> torch.Tensor:
    """Every row once: blocks of `block_rows` consecutive rows in a random order, `window_blocks` at a time, the
    rows of each window in a random order."""
    visited = block_order(rows, block_rows, generator)
    starts = visited * block_rows
    # the rows of the blocks in block order: block b contributes rows [b*block_rows, min((b+1)*block_rows, rows))
    lengths = torch.clamp(rows - starts, max=block_rows)
    in_order = torch.repeat_interleave(starts, lengths) + (
        torch.arange(int(lengths.sum())) - torch.repeat_interleave(torch.cumsum(lengths, 0) - lengths, lengths))
    bounds = torch.cumsum(lengths, 0)[window_blocks - 1::window_blocks].tolist()
    if not bounds or bounds[-1] != rows:
        bounds.append(rows)
    pieces, start = [], 0
    for stop in bounds:
        window = in_order[start:stop]
        pieces.append(window[torch.randperm(len(window), generator=generator)])
        start = stop
    return torch.cat(pieces)


class WindowedIndexBatchSampler(IndexBatchSampler):
    """IndexBatchSampler whose epoch order is `windowed_order`, seeded by seed + epoch (padding, DDP sharding and
    batching are the base class's)."""

    def __init__(self, length: int, batch_size: int, drop_last: bool, world: int, rank: int, seed: int,
                 block_rows: int, window_blocks: int):
        super().__init__(length, batch_size, True, drop_last, world, rank, seed)
        self.block_rows, self.window_blocks = block_rows, window_blocks

    def epoch_order(self) -> torch.Tensor:
        return windowed_order(self.length, self.block_rows, self.window_blocks, self.generator())

    def generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed + self.epoch)

    def windows(self) -> list[torch.Tensor]:
        """This epoch's windows, in the order they are served: the blocks each one holds."""
        return list(block_order(self.length, self.block_rows, self.generator()).split(self.window_blocks))
