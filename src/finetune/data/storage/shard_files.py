"""The file level of the shard store: the format's constants, columns and their numpy storage, writing a file
atomically (a temporary named after its writer, fsync'd and renamed), hashing, mapping a .npy file, and finding the
temporaries killed writers left behind."""

from __future__ import annotations

import errno
import hashlib
import logging
import mmap
import os
import re
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from finetune.errors import ConfigError
from finetune.run.processes import process_alive

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


def writer_tag() -> str:
    """`<host>-<pid>` of this process, as a temporary file's name carries it (the host's dots made `_`)."""
    return f"{re.sub(r'[^A-Za-z0-9-]', '_', socket.gethostname())}-{os.getpid()}"


# `.<final name>.<host>-<pid>.<random>.tmp`: who wrote a temporary, so a later process can tell a dead writer's
TEMPORARY_PATTERN = re.compile(r"\.(?P<target>.+)\.(?P<host>[A-Za-z0-9_-]+)-(?P<pid>\d+)\.[^.]+\.tmp")
STALE_SECONDS = 3600  # a temporary of another host untouched this long has no live writer (a shard takes seconds)


def stale_temporaries(folder: Path) -> list[Path]:
    """Temporaries in `folder` whose writer is gone: of this host, when its pid no longer runs; of another host (or
    of a name without a writer), when untouched for STALE_SECONDS. A live writer's are never in the list."""
    here = writer_tag().rsplit("-", 1)[0]
    stale = []
    for path in folder.glob(".*.tmp"):
        match = TEMPORARY_PATTERN.fullmatch(path.name)
        try:
            if match and match["host"] == here:
                if not process_alive(int(match["pid"])):
                    stale.append(path)
            elif time.time() - path.stat().st_mtime > STALE_SECONDS:
                stale.append(path)
        except FileNotFoundError:  # its writer renamed it meanwhile
            continue
    return stale


def write_atomically(path: Path, write) -> None:
    """write(handle) to a temporary file in the same folder, fsync, rename over `path`. The temporary's name says
    which process writes it (stale_temporaries), so what a kill leaves behind is cleared by the next open."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{writer_tag()}.", suffix=".tmp")
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
