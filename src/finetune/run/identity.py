"""What identifies the code and the inputs behind something stored (a cache entry, a split): the package's version,
a digest of source files, and the digest of any JSON-able description."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
from pathlib import Path


def package_version() -> str:
    """The installed distribution's version; "source" when the package runs from a checkout that was never
    installed (PYTHONPATH=src, as on a machine without pip access). Cache keys digest the source code as well."""
    try:
        return importlib.metadata.version("finetune")
    except importlib.metadata.PackageNotFoundError:
        return "source"


def digest(description, length: int = 16, data: bytes = b"") -> str:
    """sha256 of a description (dicts, lists, numbers, strings; other values by str()) in canonical JSON, followed by
    `data` (raw bytes, e.g. a label vector): the one digest behind cache keys and split ids."""
    blob = json.dumps(description, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode() + data).hexdigest()[:length]


def source_digest(paths, length: int = 16) -> str:
    """sha256 of the bytes of these source files, in sorted order: editing any of them changes it."""
    sha = hashlib.sha256()
    for path in sorted(set(map(str, paths))):
        sha.update(Path(path).read_bytes())
    return sha.hexdigest()[:length]
