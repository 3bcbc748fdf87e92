"""finetune-bench storage: the storage library for the image store and the feature cache, chosen by measurement.

The same rows (uint8 images, H x W x 3, random content) are written and read back by each candidate:
- npy: this project's store (`shard_store.py`: .npy shards memory-mapped, batches gathered by index_select);
- safetensors: one file per shard, opened with `safe_open` (itself a memory map), rows read by `get_slice`;
- litdata (Lightning's `optimize` + `StreamingDataset`, if installed): its chunked format, rows read by index, and
  its own shuffled loader (chunk-wise shuffle).

Reported per library and size: write seconds, bytes on disk, random batches (64 uniform random rows, the access a
seeded per-sample epoch order makes) in images/s on a first and a second pass, and sequential reads. Pages stay in
the OS page cache between passes (dropping it needs root), so "first pass" is warm for whatever the write left.
Prints a table, writes JSON, asserts nothing.

    finetune-bench storage                          # 10,000 and 40,000 rows of 128 px
    finetune-bench storage --rows 2000 --size 64    # a quick look
"""

from __future__ import annotations

import argparse
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from finetune.bench.report import write_report
from finetune.data.storage.shard_store import Column, Store, default_rows_per_shard

BATCH = 64


def rows_of(count: int, size: int, start: int = 0) -> np.ndarray:
    """Deterministic pseudo-random uint8 images [count, size, size, 3] (incompressible, as JPEG-decoded pixels)."""
    return np.random.default_rng(start).integers(0, 256, (count, size, size, 3), dtype=np.uint8)


def blocks(rows: int, per_shard: int):
    return [(start, min(start + per_shard, rows)) for start in range(0, rows, per_shard)]


def expected_row(index: int, rows: int, per_shard: int, size: int) -> np.ndarray:
    first = index // per_shard * per_shard
    return rows_of(min(first + per_shard, rows) - first, size, first)[index - first]


def measure_reads(read_batch: Callable[[torch.Tensor], object], rows: int, seed: int = 0) -> dict:
    """images/s of random batches over one pass (two passes) and of sequential batches; first, the first and last
    rows read back equal what was written."""
    size = int(np.asarray(read_batch(torch.tensor([0]))).shape[1])
    per_shard = default_rows_per_shard(size * size * 3)
    for index in (0, rows - 1):
        got = np.asarray(read_batch(torch.tensor([index])))[0]
        if not np.array_equal(got, expected_row(index, rows, per_shard, size)):
            raise AssertionError(f"row {index} read back differs from the row written")
    result = {}
    for name, order in (("random_first", torch.randperm(rows, generator=torch.Generator().manual_seed(seed))),
                        ("random_second", torch.randperm(rows, generator=torch.Generator().manual_seed(seed + 1))),
                        ("sequential", torch.arange(rows))):
        start = time.perf_counter()
        for batch in order.split(BATCH):
            read_batch(batch)
        result[name] = round(rows / (time.perf_counter() - start))
    return result


def npy_maps(folder: Path, rows: int, size: int) -> dict:
    store = Store(str(folder))
    columns = {"images": Column("uint8", (size, size, 3))}
    per_shard = default_rows_per_shard(columns["images"].row_bytes)
    entry = store.entry("bench")
    start = time.perf_counter()
    entry.create({"kind": "bench"}, rows, per_shard, columns)
    for shard, (first, stop) in enumerate(blocks(rows, per_shard)):
        entry.write_shard(shard, {"images": rows_of(stop - first, size, first)})
    entry.finish()
    write = time.perf_counter() - start
    mapped = entry.open()
    return {"write_seconds": round(write, 2), **measure_reads(lambda index: mapped.gather("images", index), rows)}


def safetensors_files(folder: Path, rows: int, size: int) -> dict:
    from safetensors import safe_open
    from safetensors.numpy import save_file

    per_shard = default_rows_per_shard(size * size * 3)
    ranges = blocks(rows, per_shard)
    start = time.perf_counter()
    for shard, (first, stop) in enumerate(ranges):
        save_file({"images": rows_of(stop - first, size, first)}, str(folder / f"shard-{shard:05d}.safetensors"))
    write = time.perf_counter() - start
    handles = [safe_open(str(folder / f"shard-{shard:05d}.safetensors"), framework="pt")
               for shard in range(len(ranges))]
    slices = [handle.get_slice("images") for handle in handles]

    def read(index: torch.Tensor):  # get_slice takes ranges, not index lists: one slice per row
        return torch.cat([slices[i // per_shard][i % per_shard:i % per_shard + 1] for i in index.tolist()])

    return {"write_seconds": round(write, 2), **measure_reads(read, rows)}


def litdata_rows(block: tuple[int, int, int]):
    """litdata's optimize input: one block of rows, yielded an item per row (a top-level function: it pickles)."""
    first, stop, size = block
    yield from ({"image": image} for image in rows_of(stop - first, size, first))


def litdata_chunks(folder: Path, rows: int, size: int) -> dict:
    from litdata import StreamingDataLoader, StreamingDataset, optimize

    per_shard = default_rows_per_shard(size * size * 3)
    start = time.perf_counter()
    optimize(fn=litdata_rows, inputs=[(first, stop, size) for first, stop in blocks(rows, per_shard)], output_dir=str(folder), chunk_bytes="256MB",
             num_workers=1, verbose=False, mode="overwrite")
    write = time.perf_counter() - start
    dataset = StreamingDataset(str(folder))

    def read(index: torch.Tensor):
        return torch.stack([torch.as_tensor(dataset[i]["image"]) for i in index.tolist()])

    result = {"write_seconds": round(write, 2), **measure_reads(read, rows)}
    shuffled = StreamingDataLoader(StreamingDataset(str(folder), shuffle=True, seed=0), batch_size=BATCH,
                                   num_workers=0)
    start = time.perf_counter()
    count = sum(len(batch["image"]) for batch in shuffled)
    result["litdata_loader_shuffled"] = round(count / (time.perf_counter() - start))
    return result


LIBRARIES = {"npy": npy_maps, "safetensors": safetensors_files, "litdata": litdata_chunks}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="finetune-bench storage", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[10_000, 40_000])
    parser.add_argument("--size", type=int, default=128, help="image side in pixels (rows are size x size x 3)")
    parser.add_argument("--libraries", nargs="+", default=list(LIBRARIES), choices=list(LIBRARIES),
                        help="npy: this project's store; litdata: pip install -e '.[bench]'")
    parser.add_argument("--work-dir", default="logs/bench_storage", help="where the stores are written (removed)")
    parser.add_argument("--out", default="bench_storage.json")
    args = parser.parse_args(argv)
    if min(*args.rows, args.size) <= 0:
        parser.error("--rows and --size must be positive")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    work = Path(args.work_dir).resolve()
    results = []
    for rows in args.rows:
        for library in args.libraries:
            run, folder = LIBRARIES[library], work / f"{rows}" / library
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            try:
                measured = run(folder, rows, args.size)
            except ImportError as err:
                print(f"{library}: not installed ({err}); pip install it to measure it", flush=True)
                continue
            disk = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
            results.append({"library": library, "rows": rows, "disk_bytes": disk, **measured})
            print(results[-1], flush=True)
            shutil.rmtree(folder, ignore_errors=True)
    header = (f"{'library':<12} | {'rows':>7} | {'write s':>7} | {'disk MiB':>8} | {'random 1st':>10} | "
              f"{'random 2nd':>10} | {'sequential':>10} | {'own loader':>10}")
    print(header + "\n" + "-" * len(header))
    for r in results:
        own = r.get("litdata_loader_shuffled", "")
        print(f"{r['library']:<12} | {r['rows']:>7,} | {r['write_seconds']:>7.1f} | {r['disk_bytes'] / 2**20:>8,.0f} | "
              f"{r['random_first']:>10,} | {r['random_second']:>10,} | {r['sequential']:>10,} | {own:>10}")
    print("(images/s; random: batches of 64 uniform random rows; own loader: litdata's shuffled StreamingDataLoader)")
    report = {"args": vars(args), "results": results, "date": time.strftime("%Y-%m-%d")}
    return write_report(report, args.out, work)


if __name__ == "__main__":
    main()
