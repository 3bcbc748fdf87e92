"""The datamodule behind strategy=cached: it serves stored backbone features instead of images. What an entry holds
is identity.py, how it is extracted extraction.py; this file finds the three splits' entries and serves their rows:
from the GPU when they fit there, else gathered from the memory map (in a windowed order when an entry is larger
than the job's memory)."""

from __future__ import annotations

import atexit
import logging
import shutil
import tempfile

import torch

from finetune.data.base import (SPLITS, ImageDataModule, IndexBatchDataset, IndexBatchLoader, SplitLoaders,
                                index_batch_loader, world_and_rank)
from finetune.data.storage.epoch_order import WindowedIndexBatchSampler, check_epoch_order, choose_window
from finetune.data.features.cache import FeatureCache
from finetune.data.features.extraction import FeatureExtraction
from finetune.data.features.identity import feature_identity
from finetune.data.storage.shard_store import MappedEntry, human_bytes
from finetune.data.storage.window_reader import WindowReader

log = logging.getLogger(__name__)


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
                       "rows_extracted": 0, "extract_buffer_rows": 0}  # FeatureExtraction's, after setup

    @property
    def num_classes(self) -> int:
        return self.images.num_classes

    def prepare_data(self) -> None:
        self.images.trainer = self.trainer  # the images' store is built by every rank under DDP (setup)
        self.images.prepare_data()

    @property
    def precision(self) -> str | None:
        """The run's precision (extraction follows it), None outside a trainer."""
        return str(self.trainer.precision) if self.trainer is not None else None

    def identity(self, device: torch.device) -> dict:
        """Everything that decides the stored numbers, but the split; any change gives another key."""
        return feature_identity(self.module, self.images, self.dtype, device, self.precision)

    def setup(self, stage: str | None = None, splits: tuple[str, ...] = SPLITS) -> None:
        """Find or build the entries of `splits` (all three for a run; the head grid asks for train and val only, so
        that it never reads the test split) and place them."""
        if self.splits or self.resident:
            return
        self.images.trainer = self.trainer
        self.images.setup(stage)  # every rank builds its share of an image store now, before any entry lock is held
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
        extraction = FeatureExtraction(self.cache, self.images, self.module, self.dtype, self.extract_batch_size,
                                       self.shard_rows, self.precision, self.trainer)
        for split in splits:
            identity = {**shared, "split": split, "num_samples": len(self.images.split_dataset(split))}
            key = self.cache.key(identity)
            self.report["cache_keys"][split] = key
            self.splits[split] = extraction.load_or_extract(split, key, identity, device)
        self.report.update(extraction.report)
        self._place(device)

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
