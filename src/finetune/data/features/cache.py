"""On-disk store of backbone features, keyed by everything that determines them.

An entry is one split's features, labels and dataset indices in the sharded, memory-mapped format of
`finetune.data.storage.shard_store` (what is verified when is written there). The key is a digest of the identity (backbone,
weights, preprocessing, data, dtype, extraction mode, code versions) and the format version.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil

import torch
from torch import nn

from finetune.data.storage.shard_store import FORMAT_VERSION, KEY_LENGTH, KEY_PATTERN, Store
from finetune.errors import ConfigError
from finetune.run.identity import digest

log = logging.getLogger(__name__)
# what else this cache writes: `<key>.lock`, and `.probe.<random>.tmp` while checking the folder is writable. Format 2 wrote one
# `<key>.pt` + `<key>.json` per entry; those are listed and cleared, never read.
LEFTOVER_PATTERN = re.compile(rf"[0-9a-f]{{{KEY_LENGTH}}}\.lock|\.probe\..+\.tmp")
OLD_FORMAT_SUFFIXES = (".pt", ".json")
# what an entry holds: backbone features (strategy=cached) or decoded images (data.store=true); features recorded no
# kind, so an entry without one is features
KINDS = ("features", "images")


def entry_kind(entry) -> str:
    return entry.manifest.get("identity", {}).get("kind", "features")


def check_kind(kind: str | None) -> str | None:
    if kind is not None and kind not in KINDS:
        raise ConfigError(f"unknown kind {kind!r}; choose one of: {', '.join(KINDS)}")
    return kind


def weights_digest(model: nn.Module) -> str:
    """sha256 of every parameter and buffer (names and bytes): a changed weight gives a changed cache key."""
    sha = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        sha.update(name.encode())
        sha.update(str(tensor.dtype).encode())
        sha.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return sha.hexdigest()[:16]


class FeatureCache(Store):
    @staticmethod
    def key(identity: dict) -> str:
        return digest({"format": FORMAT_VERSION, **identity}, KEY_LENGTH)

    def old_format_entries(self) -> list[str]:
        """Keys of format-2 entries (one `<key>.pt` and a `<key>.json` manifest listing its tensors)."""
        if not self.root.is_dir():
            return []
        found = []
        for path in sorted(self.root.glob("*.json")):
            if not KEY_PATTERN.fullmatch(path.stem):
                continue
            try:
                manifest = json.loads(path.read_text())
            except (OSError, UnicodeDecodeError, json.JSONDecodeError):
                continue
            if isinstance(manifest, dict) and manifest.get("key") == path.stem and "tensors" in manifest:
                found.append(path.stem)
        return found

    def entries_of(self, kind: str | None = None) -> list:
        """The entries (newest first) of one kind (features or images), or of every kind."""
        return [e for e in self.entries() if check_kind(kind) is None or entry_kind(e) == kind]

    def clear(self, kind: str | None = None) -> int:
        """Remove the cache's own files only: every entry folder (of `kind`, or all), and with all kinds the old
        format's files, the locks and temporary files whose names only this cache writes; with one kind, its
        entries' locks. Returns the bytes freed."""
        freed = 0
        cleared = self.entries_of(kind)
        for entry in cleared:
            freed += sum(p.stat().st_size for p in entry.folder.iterdir() if p.is_file())
            shutil.rmtree(entry.folder, ignore_errors=True)
        if kind is None:
            doomed = [p for p in self.root.iterdir() if p.is_file() and LEFTOVER_PATTERN.fullmatch(p.name)]
        else:  # another kind's builder may hold its lock right now
            doomed = [self.root / f"{entry.key}.lock" for entry in cleared]
        if kind != "images":  # the old single-file format held features
            doomed += [self.root / f"{key}{suffix}" for key in self.old_format_entries()
                       for suffix in OLD_FORMAT_SUFFIXES]
        for path in doomed:
            if path.exists():
                freed += path.stat().st_size
                path.unlink(missing_ok=True)
        return freed
