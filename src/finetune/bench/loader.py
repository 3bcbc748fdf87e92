"""finetune-bench loader: images/s delivered in model-input form with training augmentation, from a folder of JPEGs,
by the PIL path (DataLoader workers decode and random-resized-crop every image every epoch) and by the store
(`data.store=true`: decoded once into memory-mapped shards, cropped and flipped per sample on the device).

It writes a folder of JPEGs at ImageNet-like sizes (about 500 x 375, smooth content plus noise), then for each path
runs the datamodule's own train loader through `on_after_batch_transfer` on `--device`, one epoch, and reports the
rate; for the store also the one-time build (decode) and its size on disk. Prints a table, writes JSON, asserts
nothing.

    finetune-bench loader                                   # 10,000 JPEGs, 224 px, CPU (minutes on 2 cores)
    finetune-bench loader --images 500 --image-size 64      # a quick look
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path

from finetune.bench.report import write_report

import numpy as np
import torch


def write_jpeg_folder(root: Path, count: int, classes: int = 10, seed: int = 0) -> Path:
    """root/<class>/<i>.jpg: count images of 400-600 x 300-450 px, low-frequency colour fields plus noise (JPEG
    sizes of tens of KiB, as photos)."""
    from PIL import Image

    generator = np.random.default_rng(seed)
    for i in range(count):
        folder = root / f"class_{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        width, height = int(generator.integers(400, 601)), int(generator.integers(300, 451))
        coarse = generator.integers(0, 256, (height // 32 + 2, width // 32 + 2, 3), dtype=np.uint8)
        field = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), dtype=np.int16)
        noisy = np.clip(field + generator.normal(0, 12, field.shape), 0, 255).astype(np.uint8)
        Image.fromarray(noisy).save(folder / f"{i}.jpg", quality=90)
    return root


def datamodule(args, root: Path, store: bool, store_dir: Path):
    from finetune.data.sources.image_folder import ImageFolderDataModule

    images = ImageFolderDataModule(root=str(root), val_fraction=0.1, test_fraction=0.1, batch_size=args.batch_size,
                                   num_workers=args.workers, image_size=args.image_size, crop_pct=0.875,
                                   augment="random_resized_crop", store=store, store_dir=str(store_dir))
    return images


def measure_epoch(images, device: torch.device) -> tuple[int, float]:
    """One epoch of the train loader, each batch made model input on `device`: (images, seconds)."""
    loader = images.split_loader("train", images.batch_size, shuffle=True, drop_last=True)
    count, start = 0, time.perf_counter()
    for batch in loader:
        batch = tuple(t.to(device, non_blocking=True) for t in batch)
        inputs, _ = images.on_after_batch_transfer(batch, 0)
        count += len(inputs)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return count, time.perf_counter() - start


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="finetune-bench loader", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="DataLoader workers (PIL path)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--work-dir", default="logs/bench_loader", help="the JPEG folder and the store (removed)")
    parser.add_argument("--out", default="bench_loader.json")
    args = parser.parse_args(argv)
    if min(args.images, args.image_size, args.batch_size) <= 0 or args.workers < 0:
        parser.error("--images, --image-size and --batch-size must be positive, --workers 0 or more")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    work = Path(args.work_dir).resolve()
    shutil.rmtree(work, ignore_errors=True)
    start = time.perf_counter()
    root = write_jpeg_folder(work / "jpegs", args.images)
    jpeg_bytes = sum(p.stat().st_size for p in root.rglob("*.jpg"))
    print(f"wrote {args.images:,} JPEGs ({jpeg_bytes / 2**20:,.0f} MiB) in {time.perf_counter() - start:.0f}s",
          flush=True)
    rows = []
    pil = datamodule(args, root, store=False, store_dir=work / "store")
    count, seconds = measure_epoch(pil, device)
    rows.append({"path": "PIL (decode every epoch)", "images": count, "seconds": round(seconds, 2),
                 "images_per_second": round(count / seconds, 1), "build_seconds": None, "disk_bytes": None})
    print(rows[-1], flush=True)
    stored = datamodule(args, root, store=True, store_dir=work / "store")
    build_start = time.perf_counter()
    stored.prepare_data()
    build = time.perf_counter() - build_start
    count, seconds = measure_epoch(stored, device)
    disk = sum(p.stat().st_size for p in (work / "store").rglob("*.npy"))
    rows.append({"path": f"store ({stored.store.size} px, {stored.store.decoder}, augmented on {device.type})",
                 "images": count,
                 "seconds": round(seconds, 2), "images_per_second": round(count / seconds, 1),
                 "build_seconds": round(build, 1), "disk_bytes": disk})
    print(rows[-1], flush=True)
    ratio = rows[1]["images_per_second"] / rows[0]["images_per_second"]
    report = {"args": vars(args), "rows": rows, "store_over_pil": round(ratio, 2), "jpeg_bytes": jpeg_bytes,
              "decoded_by_store_build": stored.store.report["images_decoded"], "date": time.strftime("%Y-%m-%d"),
              "device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)"}
    header = f"{'path':<56} | {'images/s':>9} | {'build s':>8} | {'disk MiB':>8}"
    print(header + "\n" + "-" * len(header))
    for row in rows:
        disk = "" if row["disk_bytes"] is None else f"{row['disk_bytes'] / 2**20:,.0f}"
        build_s = "" if row["build_seconds"] is None else f"{row['build_seconds']:.1f}"
        print(f"{row['path']:<56} | {row['images_per_second']:>9,.0f} | {build_s:>8} | {disk:>8}")
    print(f"store / PIL: {ratio:.2f}x")
    return write_report(report, args.out, work)


if __name__ == "__main__":
    main()
