"""Extracting a feature-cache entry: the backbone runs over a split in eval mode, under inference mode, in the run's
precision, one shard's rows at a time, and each full shard is written before the next starts, so the host holds one
shard and the device one batch whatever the split's size. A killed build resumes from its complete shards; under DDP
the shards are dealt out across ranks (storage/shard_build.py). On a hit, a few rows are recomputed (the probe) and
checked against the stored ones, which catches a change the key cannot see."""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from finetune.callbacks.run_meter import peak_memory_mb, reset_peak_memory
from finetune.data.base import ImageDataModule, world_and_rank
from finetune.data.features.cache import FeatureCache
from finetune.data.features import identity as entry_identity  # its extraction_mode, looked up at each call (tests patch it)
from finetune.data.sources.file_listing import record_files
from finetune.data.storage.shard_build import build_across_ranks, finish_entry
from finetune.data.storage.shard_store import Column, Entry, MappedEntry, default_rows_per_shard
from finetune.run.progress import Progress

log = logging.getLogger(__name__)
PROBE_SAMPLES = 4


@torch.inference_mode()
def iter_features(backbone: torch.nn.Module, images: ImageDataModule, split: str, indices: torch.Tensor,
                  batch_size: int, device: torch.device, dtype: torch.dtype, precision: str | None = None):
    """Run the backbone over samples `indices` of a split (eval transforms, eval mode, inference mode, in the
    extraction_mode of the device and precision), one batch at a time: yields (features as `dtype` on `device`,
    labels on the host)."""
    backbone.eval()
    mode = entry_identity.extraction_mode(device, precision)
    autocast = torch.autocast(device.type, dtype=getattr(torch, mode["autocast"] or "float32"),
                              enabled=mode["autocast"] is not None)
    for batch_images, batch_labels in images.subset_loader(split, indices, batch_size):
        inputs = images.preprocess(batch_images.to(device, non_blocking=True))
        if mode["channels_last"]:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        with autocast:
            features = backbone(inputs)
        yield features.float().to(dtype), torch.as_tensor(batch_labels).cpu()


def extract_features(backbone: torch.nn.Module, images: ImageDataModule, split: str, indices: torch.Tensor,
                     batch_size: int, device: torch.device, dtype: torch.dtype,
                     precision: str | None = None) -> dict[str, torch.Tensor]:
    """The features of a few samples in one tensor (the probe); whole splits stream through iter_features."""
    batches = list(iter_features(backbone, images, split, indices, batch_size, device, dtype, precision))
    return {"features": torch.cat([f for f, _ in batches]), "labels": torch.cat([y for _, y in batches])}


def probe_indices(total: int) -> torch.Tensor:
    """A few fixed samples spread over the split, recomputed on every cache hit."""
    return torch.linspace(0, total - 1, min(PROBE_SAMPLES, total)).round().long().unique()


def relative_error(stored: torch.Tensor, fresh: torch.Tensor) -> float:
    """Largest per-sample ||stored - fresh|| / ||fresh||."""
    stored, fresh = stored.float().cpu(), fresh.float().cpu()
    return ((stored - fresh).norm(dim=1) / fresh.norm(dim=1).clamp_min(1e-12)).max().item()


def log_resume(split: str, entry: Entry, missing: list[int]) -> None:
    """Say what a build that finds some shards already written keeps and still has to do."""
    if not missing or len(missing) == entry.num_shards:
        return
    todo = sum(stop - start for start, stop in map(entry.shard_range, missing))
    log.info("resuming extraction of %s features at row %s of %s: %s rows in %d complete shards kept, %s to extract "
             "(%s)", split, f"{entry.shard_range(missing[0])[0]:,}", f"{entry.rows:,}", f"{entry.rows - todo:,}",
             entry.num_shards - len(missing), f"{todo:,}", entry.folder)


class FeatureExtraction:
    """Finds each split's entry in the cache and builds the shards it lacks; `report` says what it cost."""

    def __init__(self, cache: FeatureCache, images: ImageDataModule, module, dtype: torch.dtype,
                 extract_batch_size: int, shard_rows: int | None, precision: str | None, trainer=None):
        self.cache, self.images, self.module, self.dtype = cache, images, module, dtype
        self.extract_batch_size, self.shard_rows = extract_batch_size, shard_rows
        self.precision, self.trainer = precision, trainer
        self.report = {"extract_seconds": 0.0, "extract_peak_memory_mb": 0.0, "cache_hit": True,
                       "rows_extracted": 0, "extract_buffer_rows": 0}

    def rows_per_shard(self, row_bytes: int) -> int:
        return self.shard_rows or default_rows_per_shard(row_bytes)

    def open_entry(self, split: str, key: str, identity: dict, device: torch.device) -> tuple[Entry, list[int]]:
        """The split's entry, laid out, its damaged shards dropped, and the rows it holds checked against a few
        recomputed ones (so a change the key cannot see, e.g. a forward hook or a patched library, is caught); with
        the shards it holds, valid."""
        entry = self.cache.entry(key)
        total = identity["num_samples"]
        probe = probe_indices(total)
        fresh = extract_features(self.module.backbone.to(device), self.images, split, probe, len(probe), device,
                                 self.dtype, self.precision)
        columns = {"features": Column(str(self.dtype).removeprefix("torch."), tuple(fresh["features"].shape[1:])),
                   "labels": Column("int64", ()), "indices": Column("int64", ())}
        entry.create(identity, total, self.rows_per_shard(columns["features"].row_bytes), columns)
        valid = entry.valid_shards()
        stored = torch.isin(torch.div(probe, entry.rows_per_shard, rounding_mode="floor"), torch.tensor(valid))
        if not stored.any():
            return entry, valid
        mapped = entry.open(valid)
        exact = self.dtype == torch.float32 and entry_identity.extraction_mode(device, self.precision)["autocast"] is None
        tolerance = 1e-3 if exact else 3e-2
        error = relative_error(mapped.gather("features", probe[stored]), fresh["features"].cpu()[stored])
        if error > tolerance or not torch.equal(mapped.gather("labels", probe[stored]), fresh["labels"][stored]):
            log.warning("feature cache entry %s is stale: recomputed %s samples differ by %.3g (relative, tolerance "
                        "%.0e); extracting again", key, split, error, tolerance)
            del mapped
            entry.remove()
            entry.create(identity, total, self.rows_per_shard(columns["features"].row_bytes), columns)
            valid = []
        return entry, valid

    def load_or_extract(self, split: str, key: str, identity: dict, device: torch.device) -> MappedEntry:
        """The split's entry, mapped: opened when complete, else its missing shards built (across ranks under DDP)."""
        world, rank = world_and_rank(self.trainer)

        def build(shards: list[int]) -> None:
            self.build(entry, split, shards, device, rank)

        if world == 1:
            with self.cache.lock(key):  # a second process that needs this entry waits, then finds it built
                entry, valid = self.open_entry(split, key, identity, device)
                missing = sorted(set(range(entry.num_shards)) - set(valid))
                log_resume(split, entry, missing)
                build(missing)
                finish_entry(entry, build)
            return entry.open()
        # Several ranks: the shards no rank holds are dealt out across all of them, then what each folder still lacks
        # (node-local folders: what the other nodes wrote) among the ranks that share it (shard_build.py)
        with self.cache.lock(key):
            entry, valid = self.open_entry(split, key, identity, device)
        if rank == 0:
            log_resume(split, entry, sorted(set(range(entry.num_shards)) - set(valid)))
        build_across_ranks(entry, valid, self.trainer.strategy, build)
        with self.cache.lock(key):
            finish_entry(entry, build)
        return entry.open()

    def build(self, entry: Entry, split: str, shards: list[int], device: torch.device, rank: int) -> None:
        """Extract the rows of `shards` and write each shard as soon as it is full: the device holds one batch, the
        host one shard (a pinned buffer the features are copied into without waiting)."""
        if not shards:
            return
        self.report["cache_hit"] = False
        if rank == 0:  # what `finetune-cache verify` checks the files against
            record_files(entry.folder, getattr(self.images.split_dataset(split), "samples", None))
        rows = sum(stop - start for start, stop in map(entry.shard_range, shards))
        reset_peak_memory(device)
        start_time = time.perf_counter()
        backbone = self.module.backbone.to(device)
        spec = entry.columns["features"]
        buffer = torch.empty((entry.rows_per_shard, *spec.shape), dtype=self.dtype, pin_memory=device.type == "cuda")
        self.report["extract_buffer_rows"] = max(self.report["extract_buffer_rows"], len(buffer))
        with Progress(f"extracting {split} features", rows, enabled=rank == 0) as progress:
            for shard in shards:
                start, stop = entry.shard_range(shard)
                labels = torch.empty(stop - start, dtype=torch.int64)
                position = 0
                for features, batch_labels in iter_features(backbone, self.images, split, torch.arange(start, stop),
                                                            self.extract_batch_size, device, self.dtype,
                                                            self.precision):
                    buffer[position:position + len(features)].copy_(features, non_blocking=True)
                    labels[position:position + len(features)] = batch_labels
                    position += len(features)
                    progress.advance(len(features))
                if device.type == "cuda":
                    torch.cuda.synchronize(device)  # the last copies into the pinned buffer have landed
                entry.write_shard(shard, {"features": spec.to_numpy(buffer[:position]), "labels": labels.numpy(),
                                          "indices": np.arange(start, stop, dtype=np.int64)})
        seconds = time.perf_counter() - start_time
        self.report["rows_extracted"] += rows
        self.report["extract_seconds"] += seconds
        self.report["extract_peak_memory_mb"] = max(self.report["extract_peak_memory_mb"], peak_memory_mb(device))
        log.info("feature cache miss: extracted %s %s rows x %s in %.1fs (%d shards) -> %s", split, f"{rows:,}",
                 tuple(spec.shape), seconds, len(shards), entry.folder)
