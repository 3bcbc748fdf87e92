"""Checking an entry of the shard store: the cheap checks of every open (sizes, .npy headers, the hashes of each
file's first and last 64 KiB: O(shards) reads) and the full sha256 of `verify()` (finetune-cache verify)."""

from __future__ import annotations

from finetune.data.storage.shard_files import EDGE_BYTES, edge_sha256, file_sha256, log


class EntryChecks:
    """The checking half of `Entry` (mixed into it): which shards are there and whole."""

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
