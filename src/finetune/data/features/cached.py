"""The datamodule behind strategy=cached: it serves stored backbone features instead of images."""

from __future__ import annotations

import atexit
import hashlib
import inspect
import logging
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from finetune.callbacks.run_meter import peak_memory_mb, reset_peak_memory
from finetune.config import auto_precision
from finetune.data import preprocessing
from finetune.data.base import (SPLITS, ImageDataModule, IndexBatchDataset, IndexBatchLoader, SplitLoaders,
                                index_batch_loader, world_and_rank)
from finetune.data.storage.epoch_order import WindowedIndexBatchSampler, check_epoch_order, choose_window
from finetune.data.features.cache import FeatureCache, weights_digest
from finetune.data.sources.file_listing import record_files
from finetune.data.storage.shard_store import Column, Entry, MappedEntry, default_rows_per_shard, human_bytes
from finetune.data.storage.window_reader import WindowReader
from finetune.run.progress import Progress
from finetune.run.identity import package_version

log = logging.getLogger(__name__)


# A backbone-config key that says where weights came from, not what they are (the weights digest says that).
WEIGHT_SOURCE_KEYS = ("pretrained", "checkpoint_path", "weights")
PROBE_SAMPLES = 4


def extraction_mode(device: torch.device, precision: str | None = None) -> dict:
    """How extraction runs on `device`: in the run's precision (trainer.precision: bf16-mixed or bf16-true under bf16
    autocast, 16-mixed or 16-true under fp16, 32-true and 64-true without autocast), as the run's own eval and
    predict do; channels_last on a GPU. Without a run (None): what precision=auto picks there. Part of the cache
    key: the same backbone gives other numbers in another mode."""
    precision = str(precision or auto_precision("gpu" if device.type == "cuda" else "cpu"))
    autocast = {"bf16": "bfloat16", "16": "float16"}.get(precision.split("-")[0])
    return {"device": device.type, "autocast": autocast, "channels_last": device.type == "cuda"}


def code_versions(images: ImageDataModule) -> dict:
    """Versions of the code that computes stored features: the libraries, and a digest of the source of this module,
    of the datamodule's classes and of data/preprocessing.py (eval geometry and normalisation), so editing any of
    them invalidates old entries."""
    import timm
    import torchvision

    sources = sorted({inspect.getsourcefile(cls) or "" for cls in type(images).__mro__
                      if not cls.__module__.startswith(("builtins", "lightning", "pytorch_lightning", "torch"))}
                     | {__file__, preprocessing.__file__})
    digest = hashlib.sha256()
    for source in filter(None, sources):
        digest.update(Path(source).read_bytes())
    return {"torch": torch.__version__, "torchvision": torchvision.__version__, "timm": timm.__version__,
            "finetune": package_version(), "source": digest.hexdigest()[:16]}


@torch.inference_mode()
def iter_features(backbone: torch.nn.Module, images: ImageDataModule, split: str, indices: torch.Tensor,
                  batch_size: int, device: torch.device, dtype: torch.dtype, precision: str | None = None):
    """Run the backbone over samples `indices` of a split (eval transforms, eval mode, inference mode, in the
    extraction_mode of the device and precision), one batch at a time: yields (features as `dtype` on `device`,
    labels on the host)."""
    backbone.eval()
    mode = extraction_mode(device, precision)
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


class MappedRows:
    """IndexBatchDataset's interface over a memory-mapped entry: each batch's rows are gathered from the maps into
    one new host tensor (pinned when it goes on to a GPU); nothing else of the entry is ever in process memory."""

    device = torch.device("cpu")

    def __init__(self, entry: MappedEntry, pin_memory: bool = False):
        self.entry, self.pin_memory = entry, pin_memory
        self.window_reader: WindowReader | None = None

    def __len__(self) -> int:
        return len(self.entry)

    def read_by_window(self, sampler: WindowedIndexBatchSampler) -> "MappedRows":
        """Serve `sampler`'s windowed epoch from RAM, each window's blocks read once (WindowReader)."""
        # ranks of a node read the same windows: leave them the page cache to share
        self.window_reader = WindowReader(self.entry, sampler, ("features", "labels"), sampler.world == 1)
        return self

    def __getitem__(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.window_reader is not None:
            return self.window_reader.gather(indices, self.pin_memory)
        return (self.entry.gather("features", indices, self.pin_memory),
                self.entry.gather("labels", indices, self.pin_memory))


def temporary_cache() -> FeatureCache:
    """A cache folder for this process only, removed at exit: where features go when the configured one is not
    writable (streaming to disk keeps memory bounded even then)."""
    folder = tempfile.mkdtemp(prefix="finetune-features-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return FeatureCache(folder)


class CachedFeatureDataModule(SplitLoaders):
    """Serves one split's stored features per loader. Setup finds each split's entry, builds the shards it lacks
    (resuming a killed build), then trains from the memory map, or from the GPU where the features fit there."""

    def __init__(self, images: ImageDataModule, module, cache_dir: str, feature_dtype: str = "float32",
                 extract_batch_size: int = 256, batch_size: int | None = None, device_max_bytes: int = 4 * 1024**3,
                 shard_rows: int | None = None, epoch_order: str = "auto", window_bytes: int | None = None):
        super().__init__()
        self.epoch_order, self.window_bytes = check_epoch_order(epoch_order), (int(window_bytes) if window_bytes else None)
        self.images, self.module = images, module
        self.cache = FeatureCache(cache_dir)
        self.dtype = getattr(torch, feature_dtype)
        self.extract_batch_size = extract_batch_size
        self.batch_size = int(batch_size or images.batch_size)
        self.eval_batch_size = max(self.batch_size, images.eval_batch_size)
        self.device_max_bytes = device_max_bytes
        self.shard_rows = int(shard_rows) if shard_rows else None
        self.splits: dict[str, MappedEntry] = {}
        self.resident: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # features on the device, when they fit
        self.report = {"extract_seconds": 0.0, "extract_peak_memory_mb": 0.0, "cache_hit": True, "cache_keys": {},
                       "rows_extracted": 0, "extract_buffer_rows": 0}

    @property
    def num_classes(self) -> int:
        return self.images.num_classes

    def prepare_data(self) -> None:
        self.images.prepare_data()

    @property
    def precision(self) -> str | None:
        """The run's precision (extraction follows it), None outside a trainer."""
        return str(self.trainer.precision) if self.trainer is not None else None

    def identity(self, device: torch.device) -> dict:
        """Everything that decides the stored numbers, but the split; any change gives another key."""
        backbone_config = {k: v for k, v in ((self.module.run_config or {}).get("backbone") or {}).items()
                           if k not in WEIGHT_SOURCE_KEYS}
        return {"backbone": self.module.backbone_name, "backbone_config": backbone_config,
                "weights": weights_digest(self.module.backbone), "preprocessing": self.images.preprocessing,
                "dataset": self.images.dataset_id, "image_source": getattr(self.images, "image_source", "memory"),
                "dtype": str(self.dtype), "extraction": extraction_mode(device, self.precision),
                "code": code_versions(self.images)}

    def setup(self, stage: str | None = None) -> None:
        if self.splits or self.resident:
            return
        device = self.training_device
        problem = self.cache.writable()
        if problem is not None:
            fallback = temporary_cache()
            log.warning("feature cache %s is not writable (%s); features go to a temporary folder %s for this run "
                        "(removed at exit)", self.cache.root, problem, fallback.root)
            self.cache = fallback
        old = self.cache.old_format_entries()
        if old:
            log.info("feature cache %s holds %d entries of the old single-file format, which is no longer read: "
                     "features are extracted again into sharded entries (`finetune-cache clear` removes the old ones)",
                     self.cache.root, len(old))
        shared = self.identity(device)
        for split in SPLITS:
            identity = {**shared, "split": split, "num_samples": len(self.images.split_dataset(split))}
            key = self.cache.key(identity)
            self.report["cache_keys"][split] = key
            self.splits[split] = self._load_or_extract(split, key, identity, device)
        self._place(device)

    # -- finding and building entries ----------------------------------------------------------------------------
    def _rows_per_shard(self, row_bytes: int) -> int:
        return self.shard_rows or default_rows_per_shard(row_bytes)

    def _open_entry(self, split: str, key: str, identity: dict, device: torch.device) -> tuple[Entry, list[int]]:
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
        entry.create(identity, total, self._rows_per_shard(columns["features"].row_bytes), columns)
        valid = entry.valid_shards()
        stored = torch.isin(torch.div(probe, entry.rows_per_shard, rounding_mode="floor"), torch.tensor(valid))
        if not stored.any():
            return entry, valid
        mapped = entry.open(valid)
        exact = self.dtype == torch.float32 and extraction_mode(device, self.precision)["autocast"] is None
        tolerance = 1e-3 if exact else 3e-2
        error = relative_error(mapped.gather("features", probe[stored]), fresh["features"].cpu()[stored])
        if error > tolerance or not torch.equal(mapped.gather("labels", probe[stored]), fresh["labels"][stored]):
            log.warning("feature cache entry %s is stale: recomputed %s samples differ by %.3g (relative, tolerance "
                        "%.0e); extracting again", key, split, error, tolerance)
            del mapped
            entry.remove()
            entry.create(identity, total, self._rows_per_shard(columns["features"].row_bytes), columns)
            valid = []
        return entry, valid

    def _load_or_extract(self, split: str, key: str, identity: dict, device: torch.device) -> MappedEntry:
        world, rank = world_and_rank(self.trainer)
        if world == 1:
            with self.cache.lock(key):  # a second process that needs this entry waits, then finds it built
                entry, valid = self._open_entry(split, key, identity, device)
                missing = sorted(set(range(entry.num_shards)) - set(valid))
                log_resume(split, entry, missing)
                self._build(entry, split, missing, device, rank)
                entry.finish()
            return entry.open()
        # Several ranks: the shards no rank holds are split between them; each rank then builds whatever its own
        # folder still lacks (with node-local folders, what the other nodes wrote), a shard at a time.
        strategy = self.trainer.strategy
        with self.cache.lock(key):
            entry, valid = self._open_entry(split, key, identity, device)
            held = torch.zeros(entry.num_shards, dtype=torch.int32, device=device)
            held[valid] = 1
        nobody = (strategy.all_gather(held).reshape(world, -1).amax(0) == 0).nonzero().flatten().tolist()
        if rank == 0:
            log_resume(split, entry, nobody)
        self._build(entry, split, nobody[rank::world], device, rank)
        strategy.barrier("feature_cache_shards")
        self._build(entry, split, entry.missing_shards(), device, rank)
        with self.cache.lock(key):
            entry.finish()
        strategy.barrier("feature_cache_written")
        return entry.open()

    def _build(self, entry: Entry, split: str, shards: list[int], device: torch.device, rank: int) -> None:
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

    # -- serving -------------------------------------------------------------------------------------------------
    def use_features(self, splits: dict[str, dict[str, torch.Tensor]], device: torch.device) -> None:
        """Serve these in-memory features instead of extracting any (the benchmark's stand-in for an extraction)."""
        self.resident = {s: (t["features"].to(device), t["labels"].to(device)) for s, t in splits.items()}

    def _place(self, device: torch.device) -> None:
        """Put the features on the accelerator when they all fit, so a head epoch never waits on host copies."""
        total = sum(entry.nbytes for entry in self.splits.values())
        if device.type == "cuda" and total <= self.device_max_bytes:
            self.resident = {s: (e.column("features", device), e.column("labels", device))
                             for s, e in self.splits.items()}

    def features(self, split: str) -> torch.Tensor:
        """A split's features in one host tensor (reads every row: for inspection and small data)."""
        return self.resident[split][0].cpu() if split in self.resident else self.splits[split].column("features")

    def labels(self, split: str) -> torch.Tensor:
        return self.resident[split][1].cpu() if split in self.resident else self.splits[split].column("labels")

    def split_loader(self, split: str, batch_size: int, shuffle: bool, drop_last: bool = False) -> IndexBatchLoader:
        if split in self.resident:
            dataset = IndexBatchDataset(*self.resident[split])
        else:
            on_gpu = self.trainer is not None and self.trainer.strategy.root_device.type == "cuda"
            entry = self.splits[split]
            dataset = MappedRows(entry, pin_memory=on_gpu)
            ranks_here = self.trainer.num_devices if self.trainer is not None else 1
            window = (choose_window(self.epoch_order, entry.nbytes, len(entry), self.window_bytes,
                                    processes=ranks_here) if shuffle else None)
            if window is not None:  # larger than the job's memory: read it about once, a window of blocks at a time
                log.info("%s features (%s) from the map in a windowed order: blocks of %d rows, %d blocks a window "
                         "(strategy.epoch_order=%s)", split, human_bytes(entry.nbytes), *window, self.epoch_order)
                world, rank = world_and_rank(self.trainer)
                sampler = WindowedIndexBatchSampler(len(dataset), batch_size, drop_last, world, rank, self.images.seed,
                                                    *window)
                return IndexBatchLoader(dataset.read_by_window(sampler), sampler, self.trainer)
        return index_batch_loader(dataset, batch_size, shuffle, drop_last, self.trainer, self.images.seed)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        features, labels = batch
        return features.float(), labels
