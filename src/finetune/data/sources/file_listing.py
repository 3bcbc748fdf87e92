"""What identifies a split of image files, at a cost that does not grow with the number of files.

A split's identity is a digest of its listing (path and label of every file, in order: what the folder scan already
read, no file opened or statted) and the size and modification time of `SAMPLED_FILES` files spread over it. A
cache hit therefore costs a handful of `stat` calls, not one per file (hours for a million files on NFS). A changed
file that is not sampled keeps the key: every entry built from files records all of them (`files.tsv.gz` in the
entry's folder: path, label, size, modification time, stated once while the entry is built, which reads every file
anyway), and `finetune-cache verify` stats them all against it.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
from pathlib import Path

from finetune.data.storage.shard_store import write_atomically

SAMPLED_FILES = 16
FILES_RECORD = "files.tsv.gz"


def sampled_positions(count: int, sampled: int = SAMPLED_FILES) -> list[int]:
    """`sampled` positions spread evenly over `count` files, the first and the last included (all when fewer)."""
    if count <= sampled:
        return list(range(count))
    return sorted({round(i * (count - 1) / (sampled - 1)) for i in range(sampled)})


def split_identity(samples: list[tuple[str, int]]) -> dict:
    """{files, listing digest, [position, size, mtime_ns] of the sampled files}: O(SAMPLED_FILES) stats."""
    listing = hashlib.sha256()
    for path, label in samples:
        listing.update(f"{path}|{label}\n".encode())
    sampled = []
    for position in sampled_positions(len(samples)):
        stat = os.stat(samples[position][0])
        sampled.append([position, stat.st_size, stat.st_mtime_ns])
    return {"files": len(samples), "listing": listing.hexdigest()[:16], "sampled": sampled}


def record_files(folder: Path, samples: list[tuple[str, int]] | None) -> None:
    """Write every file's size and modification time into the entry's folder (what `verify` checks them against),
    once per entry: a resumed build keeps the record of the build it resumes."""
    if samples is None or (folder / FILES_RECORD).exists():
        return

    def write(handle):
        with gzip.GzipFile(fileobj=handle, mode="wb", mtime=0) as packed, io.TextIOWrapper(packed) as text:
            for path, label in samples:
                stat = os.stat(path)
                text.write(f"{path}\t{label}\t{stat.st_size}\t{stat.st_mtime_ns}\n")

    write_atomically(folder / FILES_RECORD, write)


def changed_files(folder: Path) -> tuple[int, list[str]] | None:
    """(files checked, what changed: one line per file) against the entry's record; None when it has none."""
    record = folder / FILES_RECORD
    if not record.exists():
        return None
    checked, changed = 0, []
    with gzip.open(record, "rt") as lines:
        for line in lines:
            path, _, size, mtime_ns = line.rstrip("\n").rsplit("\t", 3)
            checked += 1
            try:
                stat = os.stat(path)
            except FileNotFoundError:
                changed.append(f"{path} is missing")
                continue
            if (stat.st_size, stat.st_mtime_ns) != (int(size), int(mtime_ns)):
                changed.append(f"{path} changed (size or modification time) since the entry was built")
    return checked, changed
