"""finetune-bench head_grid: what a head grid (finetune.compare.head_grid) costs as it widens and as the data grows.

For each size, a grid of 1, 4, 16 and 64 heads (lr from 1e-4 to 1e-1, weight decay cycling 0, 1e-4, 1e-3, 1e-2) is
fitted on the same cached features, alternately, `--repeats` times each, and the fastest wall time kept (a shared
machine's noise only adds). The features are extracted once per size by a first, untimed grid (its extraction time
is reported); every timed grid is a cache hit. What a user weighs a grid against is also timed: one real
`finetune-train strategy=cached test=false` run of one head on the same cache entries (its metrics.json fit_seconds,
RunMeter's: Lightning's loop with validation every epoch and the default callbacks), once per repeat, the fastest
kept. Sizes:

- `digits`: the default run's data and backbone (efficientnet_lite0 pretrained at 64 px): 1,257 train rows;
- `fake:N`: N random train rows (and N/4 val) through the same backbone at 32 px: the same 1280-wide features and
  10 classes, so only the row count differs.

Prints a table (seconds, seconds per epoch, ratio to the grid of 1 and to the real run) and writes JSON; asserts
nothing.

    finetune-bench head_grid                                   # digits and fake:32000 on the CPU, 1 thread
    finetune-bench head_grid --sizes digits --heads 1 16 --repeats 1
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from finetune.bench.report import text_table, write_report

WEIGHT_DECAYS = (0.0, 1e-4, 1e-3, 1e-2)


def grid_of(count: int) -> list[dict[str, float]]:
    """`count` distinct settings: lrs log-spaced over 1e-4..1e-1, weight decays cycling."""
    return [{"lr": 10 ** (-4 + 3 * i / max(count - 1, 1)), "weight_decay": WEIGHT_DECAYS[i % len(WEIGHT_DECAYS)]}
            for i in range(count)]


def size_overrides(size: str, args) -> list[str]:
    """The finetune-train overrides of a size: `digits`, or `fake:N` (N train rows)."""
    common = [f"trainer.accelerator={args.device}", f"data.batch_size={args.batch_size}", "logger=csv"]
    if size == "digits":
        return common
    name, _, rows = size.partition(":")
    if name != "fake" or not rows.isdigit() or int(rows) <= 0:
        raise SystemExit(f"finetune-bench head_grid: --sizes entry {size!r}; choose digits or fake:N (N train rows)")
    return [*common, "data=fake", f"data.num_samples={rows}", "data.native_size=8", "data.image_size=32",
            "data.eval_batch_size=256"]


def measure_size(size: str, args, work: Path) -> list[dict]:
    from finetune.compare.head_grid import fit_head_grid
    from finetune.config import compose_config
    from finetune.train import train

    overrides = [*size_overrides(size, args), *args.overrides, f"paths.output_dir={work / 'run'}",
                 f"paths.cache_dir={work / 'cache'}"]
    epochs = args.epochs.get(size)
    cold = fit_head_grid(compose_config(overrides), grid_of(1), epochs=epochs)  # extracts: untimed
    print(f"{size}: features extracted in {cold['extract_seconds']:.1f}s ({cold['samples']:,} train rows)", flush=True)
    best: dict[int, float] = {}
    real = float("inf")
    for repeat in range(args.repeats):
        for count in args.heads:
            result = fit_head_grid(compose_config(overrides), grid_of(count), epochs=epochs)
            assert result["extract_seconds"] == 0, "every timed grid reads the cache"
            best[count] = min(best.get(count, float("inf")), result["seconds"])
            print(f"{size}: {count} heads, repeat {repeat + 1}: {result['seconds']:.2f}s "
                  f"({'stacked' if result['stacked'] else 'torch.optim'})", flush=True)
        # the real run of the grid of 1's head: the same cache entries, data order, epochs and schedule
        lr, weight_decay = grid_of(1)[0]["lr"], grid_of(1)[0]["weight_decay"]
        metrics = train(compose_config([*overrides, f"paths.output_dir={work / f'real{repeat}'}", "test=false",
                                        f"optimizer.lr={lr}", f"optimizer.weight_decay={weight_decay}",
                                        *([f"trainer.max_epochs={epochs}"] if epochs else [])]))
        # the first extracts the test split only (the grid never reads it), in setup, before its fit clock starts
        assert repeat == 0 or metrics["extract_seconds"] == 0, "the real run reads the grid's cache entries"
        real = min(real, metrics["fit_seconds"])
        print(f"{size}: one real finetune-train run, repeat {repeat + 1}: {metrics['fit_seconds']:.2f}s fit",
              flush=True)
    one = best.get(1)
    return [{"size": size, "rows": cold["samples"], "epochs": cold["epochs"], "heads": count,
             "seconds": round(seconds, 3), "seconds_per_epoch": round(seconds / cold["epochs"], 3),
             "over_grid1": round(seconds / one, 3) if one else None, "real_fit_seconds": round(real, 3),
             "over_real": round(seconds / real, 3), "extract_seconds": round(cold["extract_seconds"], 2)}
            for count, seconds in sorted(best.items())]


def format_table(rows: list[dict]) -> str:
    headers = ["size", "train rows", "epochs", "heads", "grid s", "s/epoch", "x grid of 1", "real run fit s",
               "x real run"]
    body = [[r["size"], f"{r['rows']:,}", str(r["epochs"]), str(r["heads"]), f"{r['seconds']:.2f}",
             f"{r['seconds_per_epoch']:.3f}", "" if r["over_grid1"] is None else f"{r['over_grid1']:.2f}",
             f"{r['real_fit_seconds']:.2f}", f"{r['over_real']:.2f}"] for r in rows]
    return text_table(headers, body)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="finetune-bench head_grid", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["digits", "fake:32000"], help="digits and/or fake:N")
    parser.add_argument("--heads", type=int, nargs="+", default=[1, 4, 16, 64], help="grid widths")
    parser.add_argument("--epochs", nargs="*", default=["fake:32000=2"], metavar="SIZE=EPOCHS",
                        help="epochs of a size (default: trainer.max_epochs, 10)")
    parser.add_argument("--batch-size", type=int, default=64, help="head batch size (data.batch_size)")
    parser.add_argument("--device", default="cpu", help="trainer.accelerator")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (on a shared machine a second one's spin-waits cost more)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--overrides", nargs="*", default=[], help="more finetune-train overrides (e.g. a backbone)")
    parser.add_argument("--work-dir", default="logs/bench_head_grid", help="cache and run folders (removed at the end)")
    parser.add_argument("--out", default="bench_head_grid.json")
    args = parser.parse_args(argv)
    if min(args.heads) <= 0 or args.repeats <= 0:
        parser.error("--heads and --repeats must be positive")
    try:
        args.epochs = {size: int(count) for size, count in (item.rsplit("=", 1) for item in args.epochs)}
    except ValueError:
        parser.error("--epochs takes SIZE=EPOCHS, e.g. fake:32000=2")
    return args


def main(argv=None) -> dict:
    import shutil

    import torch

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    work = Path(args.work_dir).resolve()
    shutil.rmtree(work, ignore_errors=True)
    rows = []
    for size in args.sizes:
        rows += measure_size(size, args, work / size.replace(":", "_"))
    print(format_table(rows))
    ratios = {r["size"]: r["over_grid1"] for r in rows if r["heads"] == 16}
    over_real = {r["size"]: r["over_real"] for r in rows if r["heads"] == 16}
    print(f"grid of 16 / grid of 1: {ratios} (goal: at most 2); grid of 16 / one real run's fit: {over_real}")
    report = {"args": vars(args), "rows": rows, "grid16_over_grid1": ratios, "grid16_over_real": over_real,
              "date": time.strftime("%Y-%m-%d"), "cpu_count": os.cpu_count(), "threads": args.threads,
              "device": args.device}
    return write_report(report, args.out, work)


if __name__ == "__main__":
    main()
