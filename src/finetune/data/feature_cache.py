"""On-disk store of backbone features, keyed by everything that determines them.

An entry is `<key>.pt` (the tensors) plus `<key>.json` (a manifest: identity, shapes, dtypes, sha256 of the .pt
file). Both are written to a temporary file and renamed into place, manifest last, so a reader sees a whole entry or
none. A file lock per key lets two processes that build the same entry take turns; the second finds it built.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from filelock import FileLock
from torch import nn

log = logging.getLogger(__name__)
FORMAT_VERSION = 2
KEY_LENGTH = 24
KEY_PATTERN = re.compile(rf"[0-9a-f]{{{KEY_LENGTH}}}")
# what else this cache writes: `<key>.lock`, and `.<key>.pt.<random>.tmp` / `.<key>.json.<random>.tmp` while writing
LEFTOVER_PATTERN = re.compile(rf"[0-9a-f]{{{KEY_LENGTH}}}\.lock|\.[0-9a-f]{{{KEY_LENGTH}}}\.(pt|json)\..+\.tmp")


def weights_digest(model: nn.Module) -> str:
    """sha256 of every parameter and buffer (names and bytes): a changed weight gives a changed cache key."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class FeatureCache:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser()

    @staticmethod
    def key(identity: dict) -> str:
        blob = json.dumps({"format": FORMAT_VERSION, **identity}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:KEY_LENGTH]

    def _paths(self, key: str) -> tuple[Path, Path]:
        return self.root / f"{key}.pt", self.root / f"{key}.json"

    @contextmanager
    def lock(self, key: str):
        """Held while an entry is looked up and, on a miss, built; a no-op where the folder is not writable."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            lock = FileLock(str(self.root / f"{key}.lock"))
            lock.acquire()
        except OSError as err:
            log.warning("feature cache %s is not writable (%s); features stay in memory for this run", self.root,
                        err.strerror or err)
            yield
            return
        try:
            yield
        finally:
            lock.release()

    def load(self, key: str) -> dict[str, torch.Tensor] | None:
        """The entry's tensors, or None on a miss; a damaged entry is reported, removed and counts as a miss."""
        data_path, manifest_path = self._paths(key)
        if not manifest_path.exists():
            return None
        try:
            manifest = json.loads(manifest_path.read_text())
            if _file_sha256(data_path) != manifest["sha256"]:
                raise ValueError("checksum mismatch")
            tensors = torch.load(data_path, map_location="cpu", weights_only=True)
            for name, spec in manifest["tensors"].items():
                if list(tensors[name].shape) != spec["shape"] or str(tensors[name].dtype) != spec["dtype"]:
                    raise ValueError(f"{name} is {tuple(tensors[name].shape)} {tensors[name].dtype}, manifest says "
                                     f"{spec['shape']} {spec['dtype']}")
        except (OSError, ValueError, KeyError, RuntimeError, json.JSONDecodeError) as err:
            log.warning("feature cache entry %s is damaged (%s); rebuilding it", key, err)
            self.remove(key)
            return None
        return tensors

    def save(self, key: str, tensors: dict[str, torch.Tensor], identity: dict) -> bool:
        """Write an entry atomically; returns False (and says so) where the folder cannot be written."""
        data_path, manifest_path = self._paths(key)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            _atomic_write(data_path, lambda handle: torch.save(tensors, handle))
            manifest = {
                "key": key, "identity": identity, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "sha256": _file_sha256(data_path), "bytes": data_path.stat().st_size,
                "tensors": {n: {"shape": list(t.shape), "dtype": str(t.dtype)} for n, t in tensors.items()},
            }
            _atomic_write(manifest_path, lambda handle: handle.write(json.dumps(manifest, indent=1, default=str).encode()))
        except OSError as err:
            log.warning("could not write feature cache entry to %s (%s); features stay in memory for this run",
                        self.root, err.strerror or err)
            return False
        return True

    def has(self, key: str) -> bool:
        return self._paths(key)[1].exists()

    def remove(self, key: str) -> None:
        for path in self._paths(key):
            path.unlink(missing_ok=True)

    def _manifests(self) -> list[tuple[Path, dict]]:
        """(path, manifest) of every cache manifest in the folder: a JSON file named `<key>.json` that says it is the
        entry `key` and lists its tensors. Anything else in the folder (a run's metrics.json ...) is not ours."""
        found = []
        for path in sorted(self.root.glob("*.json")):
            if not KEY_PATTERN.fullmatch(path.stem):
                continue
            try:
                manifest = json.loads(path.read_text())
            except (OSError, UnicodeDecodeError, json.JSONDecodeError):
                continue
            if isinstance(manifest, dict) and manifest.get("key") == path.stem and "tensors" in manifest:
                found.append((path, manifest))
        return found

    def entries(self) -> list[dict]:
        """Manifests of the complete entries, newest first, each with its size on disk."""
        found = []
        for manifest_path, manifest in self._manifests():
            data_path = manifest_path.with_suffix(".pt")
            manifest["bytes"] = data_path.stat().st_size if data_path.exists() else 0
            found.append(manifest)
        return sorted(found, key=lambda m: m.get("created", ""), reverse=True)

    def clear(self) -> int:
        """Remove the cache's own files only: each entry a manifest names (its .json and .pt), and the locks and
        temporary files whose names only this cache writes. Returns the bytes freed."""
        doomed = [path for manifest_path, _ in self._manifests() for path in (manifest_path.with_suffix(".pt"),
                                                                               manifest_path)]
        doomed += [p for p in self.root.iterdir() if p.is_file() and LEFTOVER_PATTERN.fullmatch(p.name)]
        freed = 0
        for path in doomed:
            if path.exists():
                freed += path.stat().st_size
                path.unlink(missing_ok=True)
        return freed
