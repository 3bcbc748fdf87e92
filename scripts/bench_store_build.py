"""The image store's build by one process against several DDP ranks (gloo, CPU) on the same folder of JPEGs.

Writes a folder of ImageNet-like JPEGs (finetune-bench loader's: 400-600 x 300-450 px, tens of KiB each), then builds
the store of its train/val/test splits (`data.store=true`, PIL decode in the process, one torch thread: one core a
rank) first in one process, then with `--ranks` processes started by Lightning Fabric (ddp_spawn on gloo), each
calling the store's prepare with its strategy as setup does under DDP. Reports per rank: images decoded, seconds
decoding, seconds waiting (in the all-gather, the barrier and finishing: the rest of its wall time), and the build's
wall time. Prints a table, writes JSON, asserts nothing.

    python scripts/bench_store_build.py --images 3000 --ranks 2 --shard-rows 64
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import torch

from finetune.bench.loader import write_jpeg_folder


def datamodule(args, root: Path, store_dir: Path):
    from finetune.data.sources.image_folder import ImageFolderDataModule

    return ImageFolderDataModule(root=str(root), val_fraction=0.1, test_fraction=0.1, image_size=args.image_size,
                                 crop_pct=0.875, num_workers=0, store=True, store_dir=str(store_dir),
                                 store_decode="pil", store_shard_rows=args.shard_rows)


def build_store(args, root: Path, store_dir: Path, strategy=None) -> dict:
    """Build the store of every split (as one rank of `strategy`, or alone): what this process did."""
    torch.set_num_threads(1)
    images = datamodule(args, root, store_dir)
    images.samples  # noqa: B018 - the listing is not part of the build
    if strategy is not None:
        strategy.barrier("start")
    start = time.perf_counter()
    images.store.prepare(strategy)
    wall = time.perf_counter() - start
    report = images.store.report
    return {"rank": strategy.global_rank if strategy is not None else 0, "images_decoded": report["images_decoded"],
            "decode_seconds": round(report["store_build_seconds"], 2), "wall_seconds": round(wall, 2),
            "waiting_seconds": round(wall - report["store_build_seconds"], 2)}


def rank_main(fabric, args, root: Path, store_dir: Path, out: Path) -> None:
    result = build_store(args, root, store_dir, fabric.strategy)
    (out / f"rank{result['rank']}.json").write_text(json.dumps(result))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=224, help="stored at the eval resize, 256 px for 224")
    parser.add_argument("--shard-rows", type=int, default=64, help="images per shard (data.store_shard_rows)")
    parser.add_argument("--work-dir", default="logs/bench_store_build", help="the JPEG folder and the stores")
    parser.add_argument("--out", default="bench_store_build.json")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    from lightning.fabric import Fabric

    args = parse_args(argv)
    work = Path(args.work_dir).resolve()
    root = work / f"jpegs-{args.images}"
    if not root.is_dir():
        write_jpeg_folder(root.with_suffix(".partial"), args.images)
        root.with_suffix(".partial").rename(root)
    rows = []
    for ranks in (1, args.ranks):
        store_dir, out = work / f"store-{ranks}", work / f"ranks-{ranks}"
        for folder in (store_dir, out):
            shutil.rmtree(folder, ignore_errors=True)
        out.mkdir(parents=True)
        start = time.perf_counter()
        if ranks == 1:
            results = [build_store(args, root, store_dir)]
        else:
            fabric = Fabric(accelerator="cpu", devices=ranks, strategy="ddp_spawn")
            fabric.launch(rank_main, args, root, store_dir, out)
            results = [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(ranks)]
        rows.append({"ranks": ranks, "build_wall_seconds": max(r["wall_seconds"] for r in results),
                     "with_process_start_seconds": round(time.perf_counter() - start, 2), "per_rank": results})
        print(rows[-1], flush=True)
    total = rows[0]["per_rank"][0]["images_decoded"]
    per_core = total / rows[0]["per_rank"][0]["decode_seconds"]
    print(f"\n{total:,} images ({args.images:,} JPEGs; train, val, test), stored at "
          f"{datamodule(args, root, work).store.size} px, {args.shard_rows} a shard; one torch thread a rank")
    header = (f"{'ranks':>5} | {'build wall s':>12} | {'images decoded per rank':>24} | {'decoding s per rank':>20} | "
              f"{'waiting s per rank':>18} | {'images/s per rank':>17}")
    print(header + "\n" + "-" * len(header))
    for row in rows:
        ranks = row["per_rank"]
        decoded = " / ".join(str(r["images_decoded"]) for r in ranks)
        decoding = " / ".join(f"{r['decode_seconds']:.1f}" for r in ranks)
        waiting = " / ".join(f"{r['waiting_seconds']:.1f}" for r in ranks)
        rate = " / ".join(f"{r['images_decoded'] / r['decode_seconds']:.0f}" for r in ranks)
        print(f"{row['ranks']:>5} | {row['build_wall_seconds']:>12.1f} | {decoded:>24} | {decoding:>20} | "
              f"{waiting:>18} | {rate:>17}")
    print(f"speed-up of {args.ranks} ranks: {rows[0]['build_wall_seconds'] / rows[1]['build_wall_seconds']:.2f}x; "
          f"one core decodes {per_core:,.0f} images/s")
    report = {"args": vars(args), "rows": rows, "images_per_second_per_core": round(per_core, 1),
              "cpu_cores": os.cpu_count(), "date": time.strftime("%Y-%m-%d")}
    Path(args.out).write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
