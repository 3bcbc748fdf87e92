"""A windowed epoch served from RAM: each window's blocks read once, with sequential reads, into one buffer.

Gathering a window's rows from the memory map leaves the pages to the kernel: under a memory limit smaller than the
entry it evicts some before the window's other rows (and the libraries' pages the process runs on) are read, and the
epoch read the entry 3-4 times. Here a window's blocks are read with plain reads into one anonymous buffer the size
of a window (the next window replaces it), the page cache is told to drop what was read, and the window's batches are
gathered from the buffer. The order, the resume and the ranks' rows are the sampler's, unchanged; the rows served are
the same bytes the map holds.
"""

from __future__ import annotations

import torch

from finetune.data.storage.epoch_order import WindowedIndexBatchSampler
from finetune.data.storage.shard_store import MappedEntry


class WindowReader:
    """Rows of `columns` for the batches of `sampler`'s windowed epoch, from a buffer holding one window's blocks."""

    def __init__(self, entry: MappedEntry, sampler: WindowedIndexBatchSampler, columns: tuple[str, ...],
                 drop_page_cache: bool = True):
        self.entry, self.sampler, self.columns = entry, sampler, columns
        self.block_rows, self.drop_page_cache = sampler.block_rows, drop_page_cache
        self.blocks = -(-len(entry) // self.block_rows)
        self.buffers: dict[str, torch.Tensor] = {}  # allocated at the first window, then reused
        self.epoch: int | None = None
        self.current = -1  # the window in the buffers
        self.bytes_read = 0

    def _start_epoch(self) -> None:
        """Learn this epoch's windows (the sampler's own draw) and forget the buffer's."""
        self.epoch, self.current = self.sampler.epoch, -1
        self.windows = self.sampler.windows()
        self.window_of_block = torch.empty(self.blocks, dtype=torch.long)
        for number, blocks in enumerate(self.windows):
            self.window_of_block[blocks] = number
        self.slot_of_block = torch.full((self.blocks,), -1, dtype=torch.long)

    def _load(self, window: int) -> None:
        """Read the window's blocks into the buffers, in file order, consecutive blocks in one read."""
        blocks = self.windows[window].sort().values
        self.slot_of_block.fill_(-1)
        self.slot_of_block[blocks] = torch.arange(len(blocks))
        if not self.buffers:
            rows = self.sampler.window_blocks * self.block_rows
            self.buffers = {name: torch.empty((rows, *self.entry.columns[name].shape), dtype=self.entry.dtype(name))
                            for name in self.columns}
        # runs of consecutive block numbers sit in consecutive slots: one read each
        breaks = (torch.diff(blocks) != 1).nonzero().flatten() + 1
        for run in torch.tensor_split(blocks, breaks):
            start = int(run[0]) * self.block_rows
            stop = min((int(run[-1]) + 1) * self.block_rows, len(self.entry))
            slot = int(self.slot_of_block[run[0]]) * self.block_rows
            for name, buffer in self.buffers.items():
                self.entry.read_rows(name, start, buffer[slot:slot + stop - start], self.drop_page_cache)
                self.bytes_read += (stop - start) * self.entry.columns[name].row_bytes
        self.current = window

    def gather(self, indices: torch.Tensor, pin_memory: bool = False) -> tuple[torch.Tensor, ...]:
        """Rows `indices` of each column in new (optionally pinned) tensors. A batch that reaches into the next
        window takes its rows of this one first, then loads the next; rows of a window already served (the padding
        a rank takes from the start of the order) come from the map."""
        if self.epoch != self.sampler.epoch:
            self._start_epoch()
        index = torch.as_tensor(indices, dtype=torch.long).cpu()
        block = torch.div(index, self.block_rows, rounding_mode="floor")
        window_of_row = self.window_of_block[block]
        out = [torch.empty((len(index), *self.entry.columns[name].shape), dtype=self.entry.dtype(name),
                           pin_memory=pin_memory) for name in self.columns]
        for window in window_of_row.unique().tolist():  # ascending: served windows, this one, then the next
            where = (window_of_row == window).nonzero().flatten()
            if window < self.current:
                for name, column in zip(self.columns, out):
                    column[where] = self.entry.gather(name, index[where])
                continue
            if window != self.current:
                self._load(window)
            rows = self.slot_of_block[block[where]] * self.block_rows + index[where] % self.block_rows
            for name, column in zip(self.columns, out):
                column[where] = self.buffers[name].index_select(0, rows)
        return tuple(out)
