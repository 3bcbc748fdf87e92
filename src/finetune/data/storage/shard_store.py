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

import errno
import hashlib
import json
import logging
import mmap
import os
import re
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from filelock import FileLock

from finetune.errors import ConfigError

log = logging.getLogger(__name__)
FORMAT_VERSION = 3
KEY_LENGTH = 24
KEY_PATTERN = re.compile(rf"[0-9a-f]{{{KEY_LENGTH}}}")
EDGE_BYTES = 64 * 1024
SHARD_BYTES = 256 * 2**20  # default shard size: about this much of an entry's widest column


def default_rows_per_shard(row_bytes: int) -> int:
    return max(1, SHARD_BYTES // max(row_bytes, 1))
# numpy has no bfloat16: its bytes are stored as uint16 and viewed back
STORAGE = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16, "int64": np.int64,
           "uint8": np.uint8}
TORCH_VIEW = {"bfloat16": (np.int16, torch.bfloat16)}


class StoreWriteError(ConfigError):
    """A shard could not be written (disk full, folder not writable): the complete shards stay for the next run."""


def human_bytes(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def edge_sha256(path: Path, size: int) -> str:
    """sha256 of a file's first and last EDGE_BYTES: a cheap check that catches a rewritten header or tail."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        digest.update(handle.read(EDGE_BYTES))
        handle.seek(max(size - EDGE_BYTES, 0))
        digest.update(handle.read(EDGE_BYTES))
    return digest.hexdigest()


def fsync_folder(folder: Path) -> None:
    """Make renames in `folder` durable (a rename is only on disk once its directory is)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomically(path: Path, write) -> None:
    """write(handle) to a temporary file in the same folder, fsync, rename over `path`."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)  # mkstemp's 0600 would hide a shared cache from the group's other users
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class HashingWriter:
    """A file handle that hashes what passes through it, so a shard's sha256 costs no second read."""

    def __init__(self, handle):
        self.handle, self.digest, self.size = handle, hashlib.sha256(), 0

    def write(self, data) -> int:
        self.digest.update(data)
        self.size += len(data)
        return self.handle.write(data)


def write_npy(handle, array: np.ndarray) -> None:
    """np.save without the whole-array copy that np.save makes for a non-file handle: header, then 16 MiB chunks."""
    np.lib.format.write_array_header_1_0(handle, np.lib.format.header_data_from_array_1_0(array))
    flat = memoryview(np.ascontiguousarray(array).reshape(-1).view(np.uint8))
    for start in range(0, len(flat), 16 << 20):
        handle.write(flat[start:start + (16 << 20)])


@dataclass(frozen=True)
class Column:
    dtype: str  # the torch dtype's name
    shape: tuple[int, ...]  # of one row

    @property
    def storage(self):
        return STORAGE[self.dtype]

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.storage).itemsize

    def to_numpy(self, tensor: torch.Tensor) -> np.ndarray:
        tensor = tensor.detach().cpu()
        if self.dtype in TORCH_VIEW:
            return tensor.view(torch.int16).numpy().view(self.storage)
        return tensor.numpy()

    def to_torch(self, array: np.ndarray) -> torch.Tensor:
        if self.dtype in TORCH_VIEW:
            signed, dtype = TORCH_VIEW[self.dtype]
            return torch.from_numpy(array.view(signed)).view(dtype)
        return torch.from_numpy(array)


class Entry:
    """One entry's folder. Not thread-safe; processes that share a folder coordinate through `Store.lock`."""

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

    def create(self, identity: dict, rows: int, rows_per_shard: int, columns: dict[str, Column]) -> None:
        """Start an entry (or keep the one there: its layout wins, so a resumed build fills the same shards)."""
        if self.manifest is not None:
            if self.manifest["rows"] != rows or self.columns != columns:
                log.warning("store entry %s holds %s rows of %s, not %s of %s; starting it again", self.key,
                            self.manifest["rows"], self.manifest["columns"], rows, columns)
                self.remove()
            else:
                if self.rows_per_shard != rows_per_shard:
                    log.info("store entry %s keeps its %d rows per shard (asked: %d)", self.key,
                             self.rows_per_shard, rows_per_shard)
                return
        self.folder.mkdir(parents=True, exist_ok=True)
        self._write_manifest({
            "format": FORMAT_VERSION, "key": self.key, "identity": identity, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "rows": int(rows), "rows_per_shard": int(max(1, min(rows_per_shard, max(rows, 1)))),
            "columns": {n: {"dtype": c.dtype, "shape": list(c.shape)} for n, c in columns.items()},
            "complete": False, "shards": []})

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

    # -- shards ------------------------------------------------------------------------------------------------
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

    def check_shard(self, record: dict) -> str | None:
        """Why the shard is unusable (missing or truncated file, header or ends changed), or None: O(1) reads."""
        start, stop = self.shard_range(record["shard"])
        if record.get("rows") != stop - start:
            return f"it holds {record.get('rows')} rows, the layout says {stop - start}"
        for column, spec in self.columns.items():
            info = record["files"].get(column)
            path = self.folder / (info or {}).get("file", self._file_name(record["shard"], column))
            if info is None or not path.exists():
                return f"{path.name} is missing"
            size = path.stat().st_size
            if size != info["bytes"]:
                return f"{path.name} is {size} bytes, {info['bytes']} were written"
            if edge_sha256(path, size) != info["edge_sha256"]:
                return f"{path.name} changed (its first or last {EDGE_BYTES // 1024} KiB differ)"
        return None

    def valid_shards(self) -> list[int]:
        """Shards that are there and pass the cheap checks; a damaged one is named, removed, and counts as missing."""
        valid = []
        for shard, record in sorted(self.records().items()):
            if shard >= self.num_shards:
                continue
            problem = self.check_shard(record)
            if problem is None:
                valid.append(shard)
                continue
            log.warning("store entry %s: shard %d (rows %d-%d) is damaged: %s; extracting those rows again",
                        self.key, shard, *self.shard_range(shard), problem)
            self.drop_shard(shard)
        return valid

    def missing_shards(self) -> list[int]:
        return sorted(set(range(self.num_shards)) - set(self.valid_shards()))

    def drop_shard(self, shard: int) -> None:
        if self.complete:  # the records stay in their own files; the manifest stops vouching for them
            self._write_manifest({**self.manifest, "complete": False, "shards": []})
        self._record_path(shard).unlink(missing_ok=True)
        for column in self.columns:
            (self.folder / self._file_name(shard, column)).unlink(missing_ok=True)

    def write_shard(self, shard: int, arrays: dict[str, np.ndarray]) -> None:
        """Write one shard's columns, each atomically, then its record: the shard exists from that rename on."""
        start, stop = self.shard_range(shard)
        files = {}
        try:
            for column, spec in self.columns.items():
                array = arrays[column]
                if array.shape != (stop - start, *spec.shape) or array.dtype != np.dtype(spec.storage):
                    raise ValueError(f"shard {shard} column {column}: got {array.shape} {array.dtype}, expected "
                                     f"{(stop - start, *spec.shape)} {np.dtype(spec.storage)}")
                path = self.folder / self._file_name(shard, column)
                writer = {}

                def write(handle, array=array, writer=writer):
                    writer["w"] = HashingWriter(handle)
                    write_npy(writer["w"], array)

                write_atomically(path, write)
                files[column] = {"file": path.name, "bytes": writer["w"].size,
                                 "sha256": writer["w"].digest.hexdigest(), "edge_sha256": edge_sha256(path, writer["w"].size)}
            record = {"shard": shard, "start": start, "rows": stop - start, "files": files}
            write_atomically(self._record_path(shard), lambda h: h.write(json.dumps(record, indent=1).encode()))
            fsync_folder(self.folder)
        except OSError as err:
            written = sum(self.shard_bytes(s) for s in self.records())
            reason = "no space left on the device" if err.errno == errno.ENOSPC else (err.strerror or str(err))
            raise StoreWriteError(
                f"could not write shard {shard} of {self.folder} ({reason}): the entry needs "
                f"{human_bytes(self.total_bytes)} in all, {human_bytes(written)} of it is written and kept; free "
                f"{human_bytes(max(self.total_bytes - written, 0))} there (or point paths.cache_dir elsewhere) and run "
                f"again to resume") from err

    def shard_bytes(self, shard: int) -> int:
        start, stop = self.shard_range(shard)
        return (stop - start) * sum(c.row_bytes for c in self.columns.values())

    def finish(self) -> bool:
        """Write the complete manifest once every shard is there; False (nothing written) while some are missing."""
        self.reload()  # another rank sharing the folder may have finished it
        if self.complete:
            return True
        records = self.records()
        if set(records) != set(range(self.num_shards)):
            return False
        self._write_manifest({**self.manifest, "complete": True, "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
                              "shards": [records[s] for s in range(self.num_shards)]})
        return True

    def open(self, shards: list[int] | None = None) -> "MappedEntry":
        """Map the entry's shards (or only `shards`, e.g. the valid ones of a partial entry)."""
        return MappedEntry(self, shards)

    def reload(self) -> None:
        """Forget the manifest read so far (another process may have finished the entry)."""
        self._manifest = None

    def verify(self) -> dict[int, str]:
        """Every file's full sha256 against its record: {damaged shard: what is wrong} (empty when all are whole)."""
        damaged = {}
        for shard, record in sorted(self.records().items()):
            for info in record["files"].values():
                path = self.folder / info["file"]
                if not path.exists():
                    damaged[shard] = f"{info['file']} is missing"
                elif file_sha256(path) != info["sha256"]:
                    damaged[shard] = f"{info['file']} does not match its sha256"
        return damaged

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


def map_npy(path: Path) -> np.ndarray:
    """A .npy file as an array over its memory map: copy-on-write, so torch takes the array without a read-only
    warning and nothing is ever written back; no byte is read until a row is."""
    with open(path, "rb") as handle:
        version = np.lib.format.read_magic(handle)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(handle)
        offset = handle.tell()
        mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
    if fortran:
        raise ValueError(f"{path} is Fortran-ordered; the store writes C order")
    count = int(np.prod(shape, dtype=np.int64))
    return np.frombuffer(mapped, dtype=dtype, count=count, offset=offset).reshape(shape)


def read_file_range(path: Path, offset: int, into: np.ndarray, drop_page_cache: bool = False) -> None:
    """Fill `into` (bytes) from `path` at `offset`: sequential reads, which the kernel reads ahead in large requests."""
    fd = os.open(path, os.O_RDONLY)
    try:
        view, done = memoryview(into), 0
        while done < len(view):
            got = os.preadv(fd, [view[done:]], offset + done)
            if got == 0:
                raise OSError(errno.EIO, f"{path} ends at byte {offset + done}, {len(view) - done} bytes early")
            done += got
        if drop_page_cache:
            os.posix_fadvise(fd, offset, len(view), os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


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
