"""finetune-cache: list, verify or clear the feature cache that strategy=cached fills.

    finetune-cache list [--cache-dir DIR]          entries, newest first: rows, shards, size, dtype, complete or how far
    finetune-cache verify [KEY] [--drop-damaged]   every shard's full sha256 (all entries, or one); names damaged shards
    finetune-cache clear [--cache-dir DIR]         remove every entry (and stale locks and temporary files)

DIR defaults to $FINETUNE_CACHE_DIR, else logs/feature_cache (the default of paths.cache_dir). `verify` exits 1 when
a shard is damaged; the next run that uses the entry finds a truncated shard itself, but a flipped byte only here.
"""

from __future__ import annotations

import argparse
import os
import sys

from finetune.data.features.cache import FeatureCache
from finetune.data.storage.shard_store import human_bytes


def describe(summary: dict) -> str:
    identity = summary["identity"]
    features = summary["columns"].get("features", {})
    state = "complete" if summary["complete"] else (
        f"partial: {summary['rows_done']:,} of {summary['rows']:,} rows, {summary['shards_done']} of "
        f"{summary['shards']} shards")
    return (f"{summary['key']}  {human_bytes(summary['bytes']):>10}  {summary.get('created') or '?'}  "
            f"{identity.get('backbone', '?')}  {identity.get('dataset', {}).get('name', '?')}  "
            f"{identity.get('split', '?')}  {summary['rows']:,} rows x {'x'.join(map(str, features.get('shape', [])))}"
            f"  {features.get('dtype', '?')}  {summary['shards']} shards  {state}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="finetune-cache", description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["list", "verify", "clear"])
    parser.add_argument("key", nargs="?", help="verify: only this entry")
    parser.add_argument("--drop-damaged", action="store_true", help="verify: remove the damaged shards")
    parser.add_argument("--cache-dir", default=os.environ.get("FINETUNE_CACHE_DIR", "logs/feature_cache"))
    args = parser.parse_args(argv)
    if args.key and args.action != "verify":
        parser.error(f"a key goes with verify only, not {args.action}")
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
        print(f"cleared {cache.root}: freed {human_bytes(freed)}")
        return 0
    entries = cache.entries()
    if args.action == "verify":
        if args.key:
            entries = [e for e in entries if e.key == args.key]
            if not entries:
                keys = ", ".join(e.key for e in cache.entries()) or "none"
                print(f"error: no entry {args.key} in {cache.root}; entries: {keys}", file=sys.stderr)
                return 2
        damaged = 0
        for entry in entries:
            summary = entry.summary()
            problems = entry.verify()
            print(f"{entry.key}  {'DAMAGED' if problems else 'ok'}  {summary['shards_done']} shards, "
                  f"{human_bytes(summary['bytes'])}")
            for shard, problem in problems.items():
                start, stop = entry.shard_range(shard)
                print(f"  shard {shard} (rows {start:,}-{stop - 1:,}): {problem}"
                      + ("; removed" if args.drop_damaged else ""))
                if args.drop_damaged:
                    entry.drop_shard(shard)
            damaged += len(problems)
        if not damaged:
            print(f"verified {len(entries)} entries in {cache.root}: all whole")
            return 0
        advice = ("the next run re-extracts their rows" if args.drop_damaged else
                  "run again with --drop-damaged to remove them; the next run then re-extracts their rows")
        print(f"verified {len(entries)} entries in {cache.root}: {damaged} damaged shards; {advice}")
        return 1
    summaries = [entry.summary() for entry in entries]
    for summary in summaries:
        print(describe(summary))
    old = cache.old_format_entries()
    if old:
        print(f"{len(old)} entries of the old single-file format (no longer read; `finetune-cache clear` removes them)")
    total = sum(s["bytes"] for s in summaries)
    print(f"{len(summaries)} entries, {human_bytes(total)} in {cache.root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
