"""finetune-bench cache: what the feature cache costs as the dataset grows (memory, opening, resuming, training).

For each size N (train rows; val and test are N/4 each) on data=fake with a cheap wide backbone, as a user would
run it (`finetune-train strategy=cached ...` in a child process, its memory read from /proc while it runs):

- `extract`: a run on a cold cache: peak RSS (VmHWM), peak anonymous RSS (what the process holds, without the
  file pages of the memory maps, which the kernel can drop), extraction time;
- `hit`: the same run again (every entry hits): the same memory figures;
- at the largest N, `killed`: a cold run SIGKILLed once at least half the rows are in complete shards, then rerun:
  the rerun's extraction time against the cold run's;
- in this process, on the largest N's entries: the time to open the three entries (manifests, cheap shard checks,
  maps; imports excluded) and the whole cached setup on a hit (data generation and the probe included);
- head training throughput (samples/s of each of 2 epochs of a Trainer fit) from the memory map against the same
  features copied into RAM.

Prints a table, writes JSON, asserts nothing.

    finetune-bench cache                                   # N = 50,000 and 500,000 (about 15 minutes on 2 cores)
    finetune-bench cache --sizes 2000 8000 --out /tmp/c.json   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from finetune.bench.report import text_table, write_report

MB = 2**20


def run_command(args, size: int, cache_dir: Path, run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "finetune.train", "strategy=cached", "backbone=timm", f"backbone.name={args.model}",
            "backbone.pretrained=false", "data=fake", f"data.num_samples={size}",
            f"data.native_size={args.native_size}", f"data.image_size={args.image_size}",
            f"strategy.feature_dtype={args.feature_dtype}", f"strategy.batch_size={args.head_batch_size}",
            f"strategy.extract_batch_size={args.extract_batch_size}", "trainer.max_epochs=1",
            "trainer.enable_progress_bar=false", "~callbacks.progress_bar", "logger=csv",
            f"paths.cache_dir={cache_dir}", f"hydra.run.dir={run_dir}"]


def status_kib(pid: int) -> dict[str, int]:
    try:
        with open(f"/proc/{pid}/status") as handle:
            return {k: int(v.split()[0]) for k, v in (line.split(":", 1) for line in handle)
                    if k in ("VmHWM", "VmRSS", "RssAnon", "RssFile")}
    except (OSError, ValueError):
        return {}


def cache_rows_written(cache_dir: Path) -> int:
    rows = 0
    for record in cache_dir.glob("*/shard-*.json"):
        try:
            rows += json.loads(record.read_text())["rows"]
        except (OSError, ValueError, KeyError):
            pass
    return rows


def measured_run(command: list[str], run_dir: Path, kill_at_rows: int | None = None, cache_dir: Path | None = None):
    """Run `command`, polling its memory every 20 ms; SIGKILL it once `kill_at_rows` rows are in shards."""
    run_dir.mkdir(parents=True, exist_ok=True)
    log = open(run_dir / "bench.log", "w")
    start = time.perf_counter()
    child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    peak = {"VmHWM": 0, "RssAnon": 0, "VmRSS": 0}
    killed = False
    while child.poll() is None:
        status = status_kib(child.pid)
        for key in peak:
            peak[key] = max(peak[key], status.get(key, 0))
        if kill_at_rows is not None and not killed and cache_rows_written(cache_dir) >= kill_at_rows:
            os.kill(child.pid, signal.SIGKILL)
            killed = True
        time.sleep(0.02)
    wall = time.perf_counter() - start
    log.close()
    if child.returncode != 0 and not killed:
        raise RuntimeError(f"{' '.join(command)} failed ({child.returncode}); see {run_dir / 'bench.log'}")
    metrics = json.loads((run_dir / "metrics.json").read_text()) if (run_dir / "metrics.json").exists() else {}
    return {"wall_seconds": round(wall, 2), "peak_rss_mb": round(peak["VmHWM"] / 1024, 1),
            "peak_anon_rss_mb": round(peak["RssAnon"] / 1024, 1), "killed": killed,
            "extract_seconds": metrics.get("extract_seconds"), "cache_hit": metrics.get("cache_hit"),
            "train_samples_per_second": metrics.get("train_samples_per_second")}


def in_process_figures(args, size: int, cache_dir: Path, out_dir: Path) -> dict:
    """Open time, hit setup time, and head throughput from the map against RAM, on the entries of `size`."""
    import lightning as L
    import torch

    from finetune.config import compose_config
    from finetune.data.features.cache import FeatureCache
    from finetune.build import build

    start = time.perf_counter()
    cache = FeatureCache(cache_dir)
    entries = [e for e in cache.entries() if e.manifest["identity"]["dataset"]["num_samples"] == size]
    mapped = [e.open(e.valid_shards()) for e in entries]
    open_seconds = time.perf_counter() - start
    rows = sum(len(m) for m in mapped)
    del mapped

    overrides = run_command(args, size, cache_dir, out_dir)[3:-1]
    cfg = compose_config([*overrides, f"paths.output_dir={out_dir}"])

    class EpochRates(L.Callback):
        """Training samples per second of each epoch (validation is off)."""

        def __init__(self):
            self.rates = []

        def on_train_epoch_start(self, trainer, module):
            self.start = time.perf_counter()

        def on_train_epoch_end(self, trainer, module):
            samples = trainer.num_training_batches * args.head_batch_size  # drop_last: whole batches
            self.rates.append(samples / (time.perf_counter() - self.start))

    def fit(datamodule_in_ram: bool) -> tuple[list[float], float]:
        L.seed_everything(cfg.seed)  # the randomly initialised backbone of the CLI runs: the same weights, the same key
        datamodule, module = build(cfg)
        begin = time.perf_counter()
        datamodule.setup("fit")
        setup_seconds = time.perf_counter() - begin
        if datamodule_in_ram:
            datamodule.use_features({"train": {"features": datamodule.features("train"),
                                               "labels": datamodule.labels("train")}}, torch.device("cpu"))
        epochs = EpochRates()
        trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=2, logger=False, enable_progress_bar=False,
                            enable_checkpointing=False, enable_model_summary=False, limit_val_batches=0,
                            num_sanity_val_steps=0, callbacks=[epochs])
        trainer.fit(module, datamodule=datamodule)
        assert datamodule.report["cache_hit"], "the in-process runs read the entries the CLI runs wrote"
        return epochs.rates, setup_seconds

    # alternate, twice each, and keep each path's best per epoch: the machine's noise hits both alike. The map's
    # first epoch maps every page it touches; from the second on the pages are mapped (RAM: a copy made first)
    rates = {"map": [], "ram": []}
    hit_setup = []
    for _ in range(2):
        rate, setup_seconds = fit(False)
        rates["map"].append(rate)
        hit_setup.append(setup_seconds)
        rates["ram"].append(fit(True)[0])
    best = {path: [max(r[e] for r in runs) for e in range(2)] for path, runs in rates.items()}
    return {"open_seconds": round(open_seconds, 3), "open_rows": rows, "hit_setup_seconds": round(max(hit_setup), 2),
            "head_samples_per_second_map": [round(r, 1) for r in best["map"]],
            "head_samples_per_second_ram": [round(r, 1) for r in best["ram"]],
            "map_over_ram": [round(m / r, 3) for m, r in zip(best["map"], best["ram"])]}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="finetune-bench cache", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[50_000, 500_000], help="train rows")
    parser.add_argument("--model", default="mobilenetv2_050", help="timm name (random init: 1280 features)")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--native-size", type=int, default=8)
    parser.add_argument("--feature-dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--head-batch-size", type=int, default=1024)
    parser.add_argument("--extract-batch-size", type=int, default=256)
    parser.add_argument("--no-kill", dest="kill", action="store_false", help="skip the kill-and-resume run")
    parser.add_argument("--work-dir", default="logs/bench_cache", help="cache folders and runs (removed at the end)")
    parser.add_argument("--out", default="bench_cache.json")
    args = parser.parse_args(argv)
    if min(args.sizes) <= 0:
        parser.error("--sizes must be positive")
    return args


def format_table(rows: list[dict]) -> str:
    headers = ["N train", "run", "peak RSS MB", "peak anon RSS MB", "extract s", "wall s", "cache hit"]
    body = [[f"{r['size']:,}", r["run"], f"{r['peak_rss_mb']:,.0f}", f"{r['peak_anon_rss_mb']:,.0f}",
             "" if r["extract_seconds"] is None else f"{r['extract_seconds']:.1f}", f"{r['wall_seconds']:.1f}",
             str(r["cache_hit"])] for r in rows]
    return text_table(headers, body)


def growth_per_100k(rows: list[dict], run: str, field: str) -> float | None:
    points = sorted((r["size"], r[field]) for r in rows if r["run"] == run)
    if len(points) < 2 or points[-1][0] == points[0][0]:
        return None
    (n0, m0), (n1, m1) = points[0], points[-1]
    return round((m1 - m0) / (n1 - n0) * 100_000, 1)


def main(argv=None) -> dict:
    args = parse_args(argv)
    work = Path(args.work_dir).resolve()
    shutil.rmtree(work, ignore_errors=True)
    rows = []
    for size in sorted(args.sizes):
        cache_dir = work / f"cache_{size}"
        for run in ("extract", "hit"):
            result = measured_run(run_command(args, size, cache_dir, work / f"{run}_{size}"), work / f"{run}_{size}")
            rows.append({"size": size, "run": run, **result})
            print(f"N={size:,} {run}: {result}", flush=True)
    largest = max(args.sizes)
    report = {"args": vars(args), "rows": rows, "date": time.strftime("%Y-%m-%d"),
              "cpu_threads": os.cpu_count()}
    if args.kill:
        cache_dir = work / "cache_killed"
        total_rows = largest + 2 * max(largest // 4, 1)
        command = run_command(args, largest, cache_dir, work / "killed")
        killed = measured_run(command, work / "killed", kill_at_rows=(total_rows + 1) // 2, cache_dir=cache_dir)
        kept = cache_rows_written(cache_dir)
        resumed = measured_run(run_command(args, largest, cache_dir, work / "resumed"), work / "resumed")
        fresh = next(r for r in rows if r["size"] == largest and r["run"] == "extract")
        report["resume"] = {"rows_total": total_rows, "rows_kept_at_kill": kept, "killed_wall_seconds":
                            killed["wall_seconds"], "resumed_extract_seconds": resumed["extract_seconds"],
                            "fresh_extract_seconds": fresh["extract_seconds"],
                            "resumed_over_fresh": round(resumed["extract_seconds"] / fresh["extract_seconds"], 3)}
        print(f"resume: {report['resume']}", flush=True)
    report["in_process"] = in_process_figures(args, largest, work / f"cache_{largest}", work / "in_process")
    print(f"in process (N={largest:,}): {report['in_process']}", flush=True)
    report["growth_mb_per_100k"] = {f"{run} {field}": growth_per_100k(rows, run, field)
                                    for run in ("extract", "hit") for field in ("peak_rss_mb", "peak_anon_rss_mb")}
    report["entry_bytes"] = {size: sum(p.stat().st_size for p in (work / f"cache_{size}").rglob("*.npy"))
                             for size in args.sizes}
    print(format_table(rows))
    print(f"growth per 100k train rows (MB): {report['growth_mb_per_100k']}")
    print(f"entries on disk (bytes): {report['entry_bytes']}")
    return write_report(report, args.out, work)


if __name__ == "__main__":
    main()
