"""finetune-cache: list or clear the feature cache that strategy=cached fills.

    finetune-cache list [--cache-dir DIR]     entries, newest first, with size, backbone, data, split, shape
    finetune-cache clear [--cache-dir DIR]    remove every entry (and stale locks and temporary files)

DIR defaults to $FINETUNE_CACHE_DIR, else logs/feature_cache (the default of paths.cache_dir).
"""

from __future__ import annotations

import argparse
import os
import sys

from finetune.data.feature_cache import FeatureCache


def human(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="finetune-cache", description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["list", "clear"])
    parser.add_argument("--cache-dir", default=os.environ.get("FINETUNE_CACHE_DIR", "logs/feature_cache"))
    args = parser.parse_args(argv)
    cache = FeatureCache(args.cache_dir)
    if not cache.root.is_dir():
        print(f"no feature cache at {cache.root}")
        return 0
    if args.action == "clear":
        try:
            freed = cache.clear()
        except OSError as err:
            print(f"error: cannot clear {cache.root}: {err.strerror or err}", file=sys.stderr)
            return 1
        print(f"cleared {cache.root}: freed {human(freed)}")
        return 0
    entries = cache.entries()
    for entry in entries:
        identity = entry.get("identity", {})
        shape = entry.get("tensors", {}).get("features", {}).get("shape")
        dataset = identity.get("dataset", {})
        print(f"{entry['key']}  {human(entry['bytes']):>10}  {entry.get('created', '?')}  "
              f"{identity.get('backbone', '?')}  {dataset.get('name', '?')}  {identity.get('split', '?')}  "
              f"{'x'.join(map(str, shape or []))}  {identity.get('dtype', '')}")
    total = sum(e["bytes"] for e in entries)
    print(f"{len(entries)} entries, {human(total)} in {cache.root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
