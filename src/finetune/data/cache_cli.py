"""finetune-cache: list, verify or clear the cache folder that strategy=cached (features) and data.store=true
(decoded images) fill.

    finetune-cache list [--kind KIND] [--cache-dir DIR]   entries, newest first: kind, rows, shards, size, dtype,
                                                          complete or how far
    finetune-cache verify [KEY] [--drop-damaged]          every shard's full sha256 (all entries, or one), and every
                                                          image file an entry was built from against the size and
                                                          modification time it had then; names damaged shards and
                                                          changed files (--drop-damaged removes the stale entry)
    finetune-cache clear [--kind KIND] [--cache-dir DIR]  remove every entry (and stale locks and temporary files),
                                                          or only the entries of one kind

KIND is `features` (backbone features, strategy=cached) or `images` (the decode-once image store, data.store=true).

DIR defaults to $FINETUNE_CACHE_DIR, else logs/feature_cache (the default of paths.cache_dir). `verify` exits 1 when
a shard is damaged; the next run that uses the entry finds a truncated shard itself, but a flipped byte only here.
"""

from __future__ import annotations

import argparse
import os
import sys

from finetune.data.features.cache import KINDS, FeatureCache, check_kind, entry_kind
from finetune.data.sources.file_listing import changed_files
from finetune.errors import ConfigError
from finetune.data.storage.shard_store import human_bytes


def describe(summary: dict, kind: str) -> str:
    identity = summary["identity"]
    rows = summary["columns"].get("features" if kind == "features" else "images", {})
    # what made the rows: the backbone for features; the stored square's size for images
    source = identity.get("backbone", "?") if kind == "features" else f"store_size={identity.get('store_size', '?')}"
    state = "complete" if summary["complete"] else (
        f"partial: {summary['rows_done']:,} of {summary['rows']:,} rows, {summary['shards_done']} of "
        f"{summary['shards']} shards")
    return (f"{summary['key']}  {kind:<8}  {human_bytes(summary['bytes']):>10}  {summary.get('created') or '?'}  "
            f"{source}  {identity.get('dataset', {}).get('name', '?')}  "
            f"{identity.get('split', '?')}  {summary['rows']:,} rows x {'x'.join(map(str, rows.get('shape', [])))}"
            f"  {rows.get('dtype', '?')}  {summary['shards']} shards  {state}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="finetune-cache", description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["list", "verify", "clear"])
    parser.add_argument("key", nargs="?", help="verify: only this entry")
    parser.add_argument("--drop-damaged", action="store_true", help="verify: remove the damaged shards")
    parser.add_argument("--kind", default=None, help="list, clear: only the entries of this kind (features, images)")
    parser.add_argument("--cache-dir", default=os.environ.get("FINETUNE_CACHE_DIR", "logs/feature_cache"))
    args = parser.parse_args(argv)
    if args.key and args.action != "verify":
        parser.error(f"a key goes with verify only, not {args.action}")
    try:
        check_kind(args.kind)
    except ConfigError as err:
        print(f"error: --kind: {err}", file=sys.stderr)
        return 2
    cache = FeatureCache(args.cache_dir)
    if not cache.root.is_dir():
        print(f"no feature cache at {cache.root}")
        return 0
    if args.action == "clear":
        try:
            freed = cache.clear(args.kind)
        except OSError as err:
            print(f"error: cannot clear {cache.root}: {err.strerror or err}", file=sys.stderr)
            return 1
        what = f"the {args.kind} entries of " if args.kind else ""
        print(f"cleared {what}{cache.root}: freed {human_bytes(freed)}")
        return 0
    entries = cache.entries_of(args.kind)
    if args.action == "verify":
        if args.key:
            entries = [e for e in entries if e.key == args.key]
            if not entries:
                keys = ", ".join(e.key for e in cache.entries()) or "none"
                print(f"error: no entry {args.key} in {cache.root}; entries: {keys}", file=sys.stderr)
                return 2
        damaged = stale = 0
        for entry in entries:
            summary = entry.summary()
            problems = entry.verify()
            files = changed_files(entry.folder)  # (checked, changed) against the files the entry was built from
            state = "DAMAGED" if problems else ("STALE" if files and files[1] else "ok")
            checked = f", {files[0]:,} files unchanged" if files and not files[1] else ""
            print(f"{entry.key}  {state}  {summary['shards_done']} shards, {human_bytes(summary['bytes'])}{checked}")
            if files and files[1]:
                stale += 1
                print(f"  {len(files[1]):,} of {files[0]:,} files changed since it was built; first: {files[1][0]}"
                      + ("; entry removed" if args.drop_damaged else ""))
                if args.drop_damaged:
                    entry.remove()
                    continue
            for shard, problem in problems.items():
                start, stop = entry.shard_range(shard)
                print(f"  shard {shard} (rows {start:,}-{stop - 1:,}): {problem}"
                      + ("; removed" if args.drop_damaged else ""))
                if args.drop_damaged:
                    entry.drop_shard(shard)
            damaged += len(problems)
        if not damaged and not stale:
            print(f"verified {len(entries)} entries in {cache.root}: all whole")
            return 0
        advice = ("the next run builds their rows again" if args.drop_damaged else
                  "run again with --drop-damaged to remove them; the next run then builds their rows again")
        print(f"verified {len(entries)} entries in {cache.root}: {damaged} damaged shards, {stale} entries built "
              f"from files that changed since; {advice}")
        return 1
    summaries = [entry.summary() for entry in entries]
    for entry, summary in zip(entries, summaries):
        print(describe(summary, entry_kind(entry)))
    old = cache.old_format_entries() if args.kind != "images" else []
    if old:
        print(f"{len(old)} entries of the old single-file format (no longer read; `finetune-cache clear` removes them)")
    total = sum(s["bytes"] for s in summaries)
    kinds = ", ".join(f"{sum(entry_kind(e) == kind for e in entries)} {kind}" for kind in KINDS
                      if args.kind in (None, kind))
    print(f"{len(summaries)} entries ({kinds}), {human_bytes(total)} in {cache.root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
