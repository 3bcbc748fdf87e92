"""Writing an entry of the shard store: starting it (or keeping the layout of the one there), each shard's files
written atomically with the record last, dropping a shard, and finishing the entry once every shard is there."""

from __future__ import annotations

import errno
import json
import time

import numpy as np

from finetune.data.storage.shard_files import (FORMAT_VERSION, Column, HashingWriter, StoreWriteError, edge_sha256,
                                               fsync_folder, human_bytes, log, stale_temporaries, write_atomically,
                                               write_npy)


class EntryWriting:
    """The writing half of `Entry` (mixed into it): uses its layout (manifest, rows, columns, shard_range, the file
    names) and leaves reading to it."""

    def create(self, identity: dict, rows: int, rows_per_shard: int, columns: dict[str, Column]) -> None:
        """Start an entry (or keep the one there: its layout wins, so a resumed build fills the same shards)."""
        self.remove_stale_temporaries()
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

    def remove_stale_temporaries(self) -> None:
        """Delete what killed writers left half-written here (up to a shard each); a live writer's stay."""
        if not self.folder.is_dir():
            return
        freed = 0
        stale = stale_temporaries(self.folder)
        for path in stale:
            try:
                freed += path.stat().st_size
                path.unlink()
            except FileNotFoundError:
                pass
        if stale:
            log.info("store entry %s: removed %d temporary file(s) of killed writers (%s)", self.key, len(stale),
                     human_bytes(freed))

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

    def drop_shard(self, shard: int) -> None:
        if self.complete:  # the records stay in their own files; the manifest stops vouching for them
            self._write_manifest({**self.manifest, "complete": False, "shards": []})
        self._record_path(shard).unlink(missing_ok=True)
        for column in self.columns:
            (self.folder / self._file_name(shard, column)).unlink(missing_ok=True)

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
