"""One head epoch from a memory-mapped feature entry, with and without a memory limit smaller than the entry.

For each size N (train rows of 1,280 float32 features, as timm mobilenetv2_050 gives, 10 classes as data=fake), an
entry is written with the shard store (random features: the epoch's reads do not depend on the values), then one
epoch of a linear head (SGD, batch 256) is run in a child process over the rows the way strategy=cached serves them
(MappedRows, the sampler CachedFeatureDataModule picks for strategy.epoch_order), for each epoch order, without a
limit and inside a cgroup memory limit of `--fraction` of the entry. Before every run the entry's pages are evicted
(posix_fadvise DONTNEED), so each run starts cold. Reported: wall seconds, GB read from the disk (/proc/PID/io
read_bytes), major page faults; a run that passes `--timeout` is stopped and shows what it had read by then.

    sudo python scripts/bench_memory_limit.py --sizes 300000 600000 --out /tmp/memory_limit.json

Needs root (to make a cgroup: v2 `memory.max`, else v1 `memory.limit_in_bytes`). Prints a table, asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GB = 1e9
ORDERS = ("shuffle", "window", "auto")


def build_entry(folder: Path, rows: int, dim: int, classes: int):
    import numpy as np

    from finetune.data.storage.shard_store import Column, Store, default_rows_per_shard

    entry = Store(folder).entry("0" * 24)
    columns = {"features": Column("float32", (dim,)), "labels": Column("int64", ()), "indices": Column("int64", ())}
    entry.create({"bench": "memory_limit"}, rows, default_rows_per_shard(columns["features"].row_bytes), columns)
    generator = np.random.default_rng(0)
    for shard in entry.missing_shards():
        start, stop = entry.shard_range(shard)
        entry.write_shard(shard, {"features": generator.standard_normal((stop - start, dim), dtype=np.float32),
                                  "labels": generator.integers(0, classes, stop - start),
                                  "indices": np.arange(start, stop, dtype=np.int64)})
    assert entry.finish()
    return entry


def evict(folder: Path) -> None:
    for path in folder.rglob("*.npy"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def epoch(folder: str, order: str, classes: int, batch_size: int, map_reads: bool = False) -> dict:
    """In the child: one epoch of a linear head over the entry, the loader built as CachedFeatureDataModule does
    (`map_reads`: a windowed epoch gathers its rows from the map, as before the window reader)."""
    import resource

    import torch

    from finetune.data.base import IndexBatchLoader, index_batch_loader
    from finetune.data.features.cached import MappedRows
    from finetune.data.storage.epoch_order import WindowedIndexBatchSampler, choose_window, memory_headroom_bytes, status_bytes
    from finetune.data.storage.shard_store import Store

    torch.set_num_threads(1)
    entry = Store(folder).entry("0" * 24).open()
    dataset = MappedRows(entry)
    headroom = memory_headroom_bytes()
    window = choose_window(order, entry.nbytes, len(entry), None, headroom)
    if window is None:
        loader = index_batch_loader(dataset, batch_size, shuffle=True, drop_last=True)
    else:
        sampler = WindowedIndexBatchSampler(len(dataset), batch_size, True, 1, 0, 0, *window)
        loader = IndexBatchLoader(dataset if map_reads else dataset.read_by_window(sampler), sampler)
    head = torch.nn.Linear(entry.columns["features"].shape[0], classes)
    optimizer = torch.optim.SGD(head.parameters(), lr=0.01)
    start, rows = time.perf_counter(), 0
    for features, labels in loader:
        loss = torch.nn.functional.cross_entropy(head(features), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        rows += len(labels)
    return {"seconds": time.perf_counter() - start, "rows_trained": rows, "window": window, "headroom": headroom, "rss_anon": status_bytes("RssAnon"),
            "majflt": resource.getrusage(resource.RUSAGE_SELF).ru_majflt}


def read_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/io") as handle:
            return next(int(line.split()[1]) for line in handle if line.startswith("read_bytes"))
    except (OSError, StopIteration):
        return 0


class MemoryCgroup:
    """A cgroup with a memory limit that a child joins before it starts (v2 if mounted, else v1)."""

    def __init__(self, name: str, limit: int):
        v2 = Path("/sys/fs/cgroup/cgroup.controllers").exists()
        self.folder = Path("/sys/fs/cgroup" if v2 else "/sys/fs/cgroup/memory") / name
        self.folder.mkdir(exist_ok=True)
        if not v2:  # no swap here; memsw must be set after the plain limit
            (self.folder / "memory.limit_in_bytes").write_text(str(limit))
        else:
            (self.folder / "memory.max").write_text(str(limit))

    def join(self) -> None:
        (self.folder / "cgroup.procs").write_text(str(os.getpid()))

    def remove(self) -> None:
        self.folder.rmdir()


def measured(folder: Path, order: str, args, cgroup: MemoryCgroup | None) -> dict:
    evict(folder)
    command = [sys.executable, __file__, "--epoch", str(folder), "--order", order, "--classes", str(args.classes),
               *(["--map-reads"] if args.map_reads else [])]
    child = subprocess.Popen(command, stdout=subprocess.PIPE, text=True,
                             preexec_fn=cgroup.join if cgroup else None)
    last, deadline = 0, time.monotonic() + args.timeout
    while child.poll() is None and time.monotonic() < deadline:
        last = read_bytes(child.pid) or last
        time.sleep(0.2)
    if child.poll() is None:
        last = read_bytes(child.pid) or last
        child.kill()
        child.wait()
        return {"order": order, "finished": False, "seconds": args.timeout, "read_gb": last / GB}
    lines = child.stdout.read().strip().splitlines()
    if child.returncode != 0 or not lines:  # e.g. killed by the limit's OOM killer
        return {"order": order, "finished": False, "seconds": float("nan"), "read_gb": last / GB,
                "returncode": child.returncode}
    return {"order": order, "finished": True, "read_gb": last / GB, **json.loads(lines[-1])}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[300_000, 600_000])
    parser.add_argument("--dim", type=int, default=1280)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--fraction", type=float, default=0.4, help="the memory limit, as a share of the entry")
    parser.add_argument("--timeout", type=float, default=150.0, help="seconds before a run is stopped")
    parser.add_argument("--orders", nargs="+", default=list(ORDERS), choices=ORDERS)
    parser.add_argument("--dir", default=None, help="where the entries are written (removed after)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--map-reads", action="store_true",
                        help="windowed epochs gather rows from the memory map (the reads before the window reader)")
    parser.add_argument("--epoch", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--order", default="auto", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.epoch:
        print(json.dumps(epoch(args.epoch, args.order, args.classes, 256, args.map_reads)))
        return
    results = []
    for size in args.sizes:
        with tempfile.TemporaryDirectory(dir=args.dir, prefix="memory-limit-") as folder:
            entry = build_entry(Path(folder), size, args.dim, args.classes)
            entry_bytes = sum(f.stat().st_size for f in Path(folder).rglob("*.npy"))
            for limit in (None, int(args.fraction * entry_bytes)):
                cgroup = MemoryCgroup(f"finetune-bench-{os.getpid()}", limit) if limit else None
                try:
                    for order in args.orders:
                        row = {"rows": size, "entry_gb": entry_bytes / GB, "limit_gb": limit / GB if limit else None,
                               **measured(Path(folder), order, args, cgroup)}
                        results.append(row)
                        print(json.dumps(row), flush=True)
                finally:
                    if cgroup:
                        cgroup.remove()
    print(f"\n{'rows':>9} {'entry':>7} {'limit':>7} {'order':>8} {'seconds':>8} {'read':>8} {'read/entry':>10}  window")
    for r in results:
        limit = f"{r['limit_gb']:.2f}GB" if r["limit_gb"] else "none"
        seconds = f"{r['seconds']:.1f}" if r["finished"] else (
            f"exit {r['returncode']}" if "returncode" in r else f">{r['seconds']:.0f}")
        window = "full shuffle" if not r.get("window") else f"{r['window'][0]} rows x {r['window'][1]} blocks"
        print(f"{r['rows']:>9,} {r['entry_gb']:>5.2f}GB {limit:>7} {r['order']:>8} {seconds:>8} "
              f"{r['read_gb']:>6.2f}GB {r['read_gb'] / r['entry_gb']:>10.2f}  {window if r['finished'] else '-'}")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
