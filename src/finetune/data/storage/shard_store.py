"""A folder of entries, each a table of rows stored as fixed-size, memory-mapped shards that survive a kill.

An entry is a folder `<key>/`: `manifest.json` (identity, row count, rows per shard, column dtypes and shapes) and,
for every shard `k` (rows `k * rows_per_shard` onwards), one `.npy` file per column plus `shard-0000k.json`, the
shard's record (rows, and per file its size, sha256 and the sha256 of its first and last 64 KiB). Every file is
written to a temporary name, fsync'd and renamed, and the record is written last: a shard exists once its record
does, so a killed build keeps its complete shards and the next build writes only the missing ones. When every shard
is there the manifest is rewritten with all the records and `complete: true`, so opening an entry reads one JSON
file and maps its shards.

What is verified when: the full sha256 of every file when it is written (kept in the record) and by `verify()`
(`finetune-cache verify`); on every open, each file's size, its .npy header (dtype, shape) and the sha256 of its
first and last 64 KiB: a truncated, missing or overwritten-at-the-ends shard is found and rebuilt alone, in
O(shards) reads. A byte flipped inside a shard is found by `verify()` only (the feature cache also recomputes a few
rows on every hit).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from filelock import FileLock

from finetune.data.storage.shard_checks import EntryChecks
from finetune.data.storage.shard_files import (EDGE_BYTES, FORMAT_VERSION, KEY_LENGTH, KEY_PATTERN, SHARD_BYTES,  # noqa: F401
                                               STORAGE, TORCH_VIEW, Column, HashingWriter, StoreWriteError,
                                               default_rows_per_shard, edge_sha256, file_sha256, fsync_folder,
                                               human_bytes, map_npy, read_file_range, stale_temporaries, write_atomically,
                                               write_npy)
from finetune.data.storage.shard_writing import EntryWriting

log = logging.getLogger(__name__)


class Entry(EntryWriting, EntryChecks):
    """One entry's folder: its layout on disk (the manifest, rows, shards, columns, file names) and opening it as
    maps; writing is EntryWriting's (shard_writing.py), checking EntryChecks' (shard_checks.py). Not thread-safe;
    processes that share a folder coordinate through `Store.lock`."""

    def __init__(self, folder: Path, key: str):
        self.folder, self.key = folder, key
        self.manifest_path = folder / "manifest.json"
        self._manifest: dict | None = None

    # -- layout ------------------------------------------------------------------------------------------------
    @property
    def manifest(self) -> dict | None:
        if self._manifest is None and self.manifest_path.exists():
            try:
                manifest = json.loads(self.manifest_path.read_text())
            except (OSError, ValueError):
                return None
            if isinstance(manifest, dict) and manifest.get("format") == FORMAT_VERSION:
                self._manifest = manifest
        return self._manifest

    def _write_manifest(self, manifest: dict) -> None:
        write_atomically(self.manifest_path, lambda h: h.write(json.dumps(manifest, indent=1, default=str).encode()))
        fsync_folder(self.folder)
        self._manifest = manifest

    @property
    def rows(self) -> int:
        return self.manifest["rows"]

    @property
    def rows_per_shard(self) -> int:
        return self.manifest["rows_per_shard"]

    @property
    def num_shards(self) -> int:
        return -(-self.rows // self.rows_per_shard)

    @property
    def columns(self) -> dict[str, Column]:
        return {n: Column(c["dtype"], tuple(c["shape"])) for n, c in self.manifest["columns"].items()}

    @property
    def complete(self) -> bool:
        return bool(self.manifest and self.manifest.get("complete"))

    @property
    def total_bytes(self) -> int:
        """What the entry takes on disk when complete (data, not headers)."""
        return self.rows * sum(c.row_bytes for c in self.columns.values())

    def shard_range(self, shard: int) -> tuple[int, int]:
        start = shard * self.rows_per_shard
        return start, min(start + self.rows_per_shard, self.rows)

    def _record_path(self, shard: int) -> Path:
        return self.folder / f"shard-{shard:05d}.json"

    def _file_name(self, shard: int, column: str) -> str:
        return f"shard-{shard:05d}.{column}.npy"

    def records(self) -> dict[int, dict]:
        """The shard records: from the manifest of a complete entry (one read), else one file per written shard."""
        if self.complete:
            return {r["shard"]: r for r in self.manifest["shards"]}
        found = {}
        for path in sorted(self.folder.glob("shard-*.json")):
            try:
                record = json.loads(path.read_text())
                found[int(record["shard"])] = record
            except (OSError, ValueError, KeyError):
                log.warning("store entry %s: unreadable shard record %s; its rows are written again", self.key, path.name)
        return found

    def shard_bytes(self, shard: int) -> int:
        start, stop = self.shard_range(shard)
        return (stop - start) * sum(c.row_bytes for c in self.columns.values())

    def open(self, shards: list[int] | None = None) -> "MappedEntry":
        """Map the entry's shards (or only `shards`, e.g. the valid ones of a partial entry)."""
        return MappedEntry(self, shards)

    def reload(self) -> None:
        """Forget the manifest read so far (another process may have finished the entry)."""
        self._manifest = None

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
        self._manifest = None

    def summary(self) -> dict:
        """What `finetune-cache list` shows: rows, shards, bytes, dtypes, complete or how far."""
        records = self.records()
        done_rows = sum(r["rows"] for r in records.values())
        size = sum(f["bytes"] for r in records.values() for f in r["files"].values())
        return {"key": self.key, "identity": self.manifest.get("identity", {}), "created": self.manifest.get("created"),
                "rows": self.rows, "rows_done": done_rows, "shards": self.num_shards, "shards_done": len(records),
                "bytes": size, "columns": self.manifest["columns"], "complete": self.complete}


class MappedEntry:
    """A complete entry's columns as memory-mapped tensors, one per shard; rows are gathered by index.

    Nothing is read until a row is. The pages a gather touches are the kernel's page cache mapped into this process:
    they count in its RSS (RssFile), are shared by every process that maps the entry (the ranks of a node), and are
    dropped by the kernel under memory pressure; the process itself allocates only the batches it gathers."""

    def __init__(self, entry: Entry, shards: list[int] | None = None):
        self.key, self.rows, self.rows_per_shard = entry.key, entry.rows, entry.rows_per_shard
        self.columns = entry.columns
        records = entry.records()
        self.shards: dict[int, dict[str, torch.Tensor]] = {}
        self.paths: dict[int, dict[str, Path]] = {}
        for shard in range(entry.num_shards) if shards is None else shards:
            self.paths[shard] = {name: entry.folder / records[shard]["files"][name]["file"] for name in self.columns}
            self.shards[shard] = {name: self.columns[name].to_torch(map_npy(path))
                                  for name, path in self.paths[shard].items()}

    def __len__(self) -> int:
        return self.rows

    def dtype(self, name: str) -> torch.dtype:
        return next(iter(self.shards.values()))[name].dtype

    def gather(self, name: str, index: torch.Tensor, pin_memory: bool = False) -> torch.Tensor:
        """Rows `index` (any order) of a column, read from the maps into one new (optionally pinned) tensor."""
        index = torch.as_tensor(index, dtype=torch.long).cpu()
        out = torch.empty((len(index), *self.columns[name].shape), dtype=self.dtype(name), pin_memory=pin_memory)
        shard_of = torch.div(index, self.rows_per_shard, rounding_mode="floor")
        local = index - shard_of * self.rows_per_shard
        first, last = (int(shard_of.min()), int(shard_of.max())) if len(index) else (0, -1)
        if first == last:
            return torch.index_select(self.shards[first][name], 0, local, out=out)
        for shard in shard_of.unique().tolist():
            where = (shard_of == shard).nonzero().squeeze(1)
            out[where] = self.shards[shard][name].index_select(0, local[where])
        return out

    def read_rows(self, name: str, start: int, out: torch.Tensor, drop_page_cache: bool = False) -> None:
        """Rows start..start + len(out) of a column into `out` (contiguous) with plain sequential reads of the
        shard files, not through the maps; with `drop_page_cache` the kernel is told to drop the pages read, so the
        bytes are held once (in `out`), not also in the page cache."""
        row_bytes = self.columns[name].row_bytes
        done = 0
        while done < len(out):
            shard, local = divmod(start + done, self.rows_per_shard)
            count = min(len(out) - done, self.rows_per_shard - local)
            path, tensor = self.paths[shard][name], self.shards[shard][name]
            # .npy data runs from its header to the end of the file
            offset = path.stat().st_size - tensor.numel() * tensor.element_size() + local * row_bytes
            read_file_range(path, offset, out[done:done + count].reshape(-1).view(torch.uint8).numpy(),
                            drop_page_cache)
            done += count

    def column(self, name: str, device: torch.device | str = "cpu") -> torch.Tensor:
        """A whole column in one tensor on `device`, filled a shard at a time (for entries that fit there)."""
        out = torch.empty((self.rows, *self.columns[name].shape), dtype=self.dtype(name), device=device)
        for shard, tensors in self.shards.items():
            start = shard * self.rows_per_shard
            out[start:start + len(tensors[name])].copy_(tensors[name])
        return out

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for shard in self.shards.values() for t in shard.values())


class Store:
    """A folder of entries, each named by a key; `<key>.lock` lets processes that build one entry take turns."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser()

    def entry(self, key: str) -> Entry:
        return Entry(self.root / key, key)

    @contextmanager
    def lock(self, key: str):
        """Held while an entry is looked up and built. A process that dies releases it (an OS file lock), so the
        next one that needs the entry takes over and resumes from the shards written so far."""
        self.root.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.root / f"{key}.lock")):
            yield

    def writable(self) -> str | None:
        """None when entries can be written here, else why not."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=self.root, prefix=".probe.", suffix=".tmp"):
                pass
        except OSError as err:
            return err.strerror or str(err)
        return None

    def entries(self) -> list[Entry]:
        """Every entry of the current format (complete or partial), newest first."""
        if not self.root.is_dir():
            return []
        found = [Entry(p, p.name) for p in self.root.iterdir() if p.is_dir() and KEY_PATTERN.fullmatch(p.name)]
        found = [e for e in found if e.manifest is not None]
        return sorted(found, key=lambda e: e.manifest.get("created", ""), reverse=True)
