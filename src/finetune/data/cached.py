"""The datamodule behind strategy=cached: it serves stored backbone features instead of images."""

from __future__ import annotations

import hashlib
import importlib.metadata
import inspect
import logging
import math
import time
from pathlib import Path

import torch

from finetune.callbacks.run_meter import peak_memory_mb, reset_peak_memory
from finetune.config import native_bf16
from finetune.data.base import (SPLITS, ImageDataModule, IndexBatchDataset, IndexBatchLoader, SplitLoaders,
                                index_batch_loader, world_and_rank)
from finetune.data.feature_cache import FeatureCache, weights_digest

log = logging.getLogger(__name__)


# A backbone-config key that says where weights came from, not what they are (the weights digest says that).
WEIGHT_SOURCE_KEYS = ("pretrained", "checkpoint_path", "weights")
PROBE_SAMPLES = 4


def extraction_mode(device: torch.device) -> dict:
    """How extraction runs on `device`: bf16 (fp16 where the GPU has no native bf16) autocast and channels_last on a
    GPU, plain fp32 on the CPU. Part of the cache key: the same backbone gives other numbers in another mode."""
    if device.type != "cuda":
        return {"device": device.type, "autocast": None, "channels_last": False}
    return {"device": "cuda", "autocast": "bfloat16" if native_bf16() else "float16", "channels_last": True}


def code_versions(images: ImageDataModule) -> dict:
    """Versions of the code that computes stored features: the libraries, and a digest of the source of this module
    and of the datamodule's classes (preprocessing lives there), so editing either invalidates old entries."""
    import timm
    import torchvision

    sources = sorted({inspect.getsourcefile(cls) or "" for cls in type(images).__mro__
                      if not cls.__module__.startswith(("builtins", "lightning", "pytorch_lightning", "torch"))}
                     | {__file__})
    digest = hashlib.sha256()
    for source in filter(None, sources):
        digest.update(Path(source).read_bytes())
    return {"torch": torch.__version__, "torchvision": torchvision.__version__, "timm": timm.__version__,
            "finetune": importlib.metadata.version("finetune"), "source": digest.hexdigest()[:16]}


@torch.inference_mode()
def extract_features(backbone: torch.nn.Module, images: ImageDataModule, split: str, indices: torch.Tensor,
                     batch_size: int, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Run the backbone once over samples `indices` of a split (eval transforms, eval mode, inference mode, in the
    device's extraction_mode): features with no graph, stored as `dtype`, in the order of `indices`."""
    backbone.eval()
    mode = extraction_mode(device)
    features, labels = [], []
    autocast = torch.autocast(device.type, dtype=getattr(torch, mode["autocast"] or "float32"),
                              enabled=mode["autocast"] is not None)
    for batch_images, batch_labels in images.subset_loader(split, indices, batch_size):
        inputs = images.preprocess(batch_images.to(device, non_blocking=True))
        if mode["channels_last"]:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        with autocast:
            features.append(backbone(inputs).float().to(dtype))
        labels.append(torch.as_tensor(batch_labels).to(device))
    return {"features": torch.cat(features), "labels": torch.cat(labels)}


def probe_indices(total: int) -> torch.Tensor:
    """A few fixed samples spread over the split, recomputed on every cache hit."""
    return torch.linspace(0, total - 1, min(PROBE_SAMPLES, total)).round().long().unique()


def relative_error(stored: torch.Tensor, fresh: torch.Tensor) -> float:
    """Largest per-sample ||stored - fresh|| / ||fresh||."""
    stored, fresh = stored.float().cpu(), fresh.float().cpu()
    return ((stored - fresh).norm(dim=1) / fresh.norm(dim=1).clamp_min(1e-12)).max().item()


def gather_in_order(strategy, share: dict[str, torch.Tensor], indices: torch.Tensor, total: int,
                    per_rank: int) -> dict[str, torch.Tensor]:
    """All ranks' shares put back in dataset order; padding rows (repeats) are dropped, as DINO's index_copy_."""
    pad = per_rank - len(indices)
    padded_index = torch.cat([indices, torch.full((pad,), -1, dtype=torch.long)]).to(share["labels"].device)
    gathered_index = strategy.all_gather(padded_index).reshape(-1)
    keep = gathered_index >= 0
    result = {}
    for name, tensor in share.items():
        padded = torch.cat([tensor, tensor[:1].expand(pad, *tensor.shape[1:])]) if pad else tensor
        gathered = strategy.all_gather(padded.contiguous()).reshape(-1, *tensor.shape[1:])
        full = torch.empty((total, *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
        result[name] = full.index_copy_(0, gathered_index[keep], gathered[keep])
    return result


class CachedFeatureDataModule(SplitLoaders):
    def __init__(self, images: ImageDataModule, module, cache_dir: str, feature_dtype: str = "float32",
                 extract_batch_size: int = 256, batch_size: int | None = None, device_max_bytes: int = 4 * 1024**3):
        super().__init__()
        self.images, self.module = images, module
        self.cache = FeatureCache(cache_dir)
        self.dtype = getattr(torch, feature_dtype)
        self.extract_batch_size = extract_batch_size
        self.batch_size = int(batch_size or images.batch_size)
        self.eval_batch_size = max(self.batch_size, images.eval_batch_size)
        self.device_max_bytes = device_max_bytes
        self.splits: dict[str, dict[str, torch.Tensor]] = {}
        self.report = {"extract_seconds": 0.0, "extract_peak_memory_mb": 0.0, "cache_hit": True, "cache_keys": {}}

    @property
    def num_classes(self) -> int:
        return self.images.num_classes

    def identity(self, device: torch.device) -> dict:
        """Everything that decides the stored numbers, but the split; any change gives another key."""
        backbone_config = {k: v for k, v in ((self.module.run_config or {}).get("backbone") or {}).items()
                           if k not in WEIGHT_SOURCE_KEYS}
        return {"backbone": self.module.backbone_name, "backbone_config": backbone_config,
                "weights": weights_digest(self.module.backbone), "preprocessing": self.images.preprocessing,
                "dataset": self.images.dataset_id, "dtype": str(self.dtype), "extraction": extraction_mode(device),
                "code": code_versions(self.images)}

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        device = self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")
        shared = self.identity(device)
        for split in SPLITS:
            identity = {**shared, "split": split, "num_samples": len(self.images.split_dataset(split))}
            key = self.cache.key(identity)
            self.report["cache_keys"][split] = key
            self.splits[split] = self._load_or_extract(split, key, identity, device)
        self._place(device)

    def _load_checked(self, split: str, key: str, device: torch.device) -> dict | None:
        """The entry, if it holds what this backbone computes now: a few fixed samples are recomputed and compared
        (so a change the key cannot see, e.g. a forward hook or a patched library, is caught rather than trained on)."""
        tensors = self.cache.load(key)
        if tensors is None:
            return None
        probe = probe_indices(len(tensors["labels"]))
        fresh = extract_features(self.module.backbone.to(device), self.images, split, probe, len(probe), device,
                                 self.dtype)
        exact = self.dtype == torch.float32 and extraction_mode(device)["autocast"] is None
        tolerance = 1e-3 if exact else 3e-2
        error = relative_error(tensors["features"][probe], fresh["features"])
        if error > tolerance or not torch.equal(tensors["labels"][probe].cpu(), fresh["labels"].cpu()):
            log.warning("feature cache entry %s is stale: recomputed %s samples differ by %.3g (relative, tolerance "
                        "%.0e); extracting again", key, split, error, tolerance)
            return None
        log.info("feature cache hit: %s %s <- %s", split, tuple(tensors["features"].shape), key)
        return tensors

    def _load_or_extract(self, split: str, key: str, identity: dict, device: torch.device) -> dict:
        world, rank = world_and_rank(self.trainer)
        if world == 1:
            with self.cache.lock(key):  # a second process building the same entry waits, then finds it
                tensors = self._load_checked(split, key, device)
                if tensors is None:
                    tensors = self._extract(split, key, identity, device, world, rank)
                    self.cache.save(key, tensors, identity)
            return tensors
        # Several ranks, perhaps several nodes with node-local cache folders: every rank looks in its own folder;
        # unless all of them hit, all extract their share and gather, and every rank that missed writes its folder.
        strategy = self.trainer.strategy
        tensors = self._load_checked(split, key, device)
        hits = strategy.all_gather(torch.tensor(tensors is not None, device=device))
        if bool(hits.all()):
            return tensors
        gathered = self._extract(split, key, identity, device, world, rank)
        if tensors is None:
            with self.cache.lock(key):  # ranks sharing one folder take turns; the first writes, the rest find it
                if not self.cache.has(key):
                    self.cache.save(key, gathered, identity)
        strategy.barrier("feature_cache_written")
        return gathered

    def _extract(self, split: str, key: str, identity: dict, device: torch.device, world: int, rank: int) -> dict:
        self.report["cache_hit"] = False
        reset_peak_memory(device)
        start = time.perf_counter()
        total = identity["num_samples"]
        indices = torch.arange(rank, total, world)  # this rank's share, no padding
        backbone = self.module.backbone.to(device)
        tensors = extract_features(backbone, self.images, split, indices, self.extract_batch_size, device,
                                   self.dtype)
        if world > 1:
            tensors = gather_in_order(self.trainer.strategy, tensors, indices, total, math.ceil(total / world))
        tensors = {name: t.cpu() for name, t in tensors.items()}
        self.report["extract_seconds"] += time.perf_counter() - start
        self.report["extract_peak_memory_mb"] = max(self.report["extract_peak_memory_mb"], peak_memory_mb(device))
        log.info("feature cache miss: extracted %s %s in %.1fs -> %s", split, tuple(tensors["features"].shape),
                 time.perf_counter() - start, key)
        return tensors

    def use_features(self, splits: dict[str, dict[str, torch.Tensor]], device: torch.device) -> None:
        """Serve these features instead of extracting any (the benchmark's stand-in for an extraction)."""
        self.splits = splits
        self._place(device)

    def _place(self, device: torch.device) -> None:
        """Keep features on the accelerator when they fit, so a head epoch never waits on host copies."""
        total = sum(t.numel() * t.element_size() for s in self.splits.values() for t in s.values())
        if device.type == "cuda" and total <= self.device_max_bytes:
            self.splits = {s: {n: t.to(device) for n, t in ts.items()} for s, ts in self.splits.items()}

    def split_loader(self, split: str, batch_size: int, shuffle: bool, drop_last: bool = False) -> IndexBatchLoader:
        tensors = self.splits[split]
        dataset = IndexBatchDataset(tensors["features"], tensors["labels"])
        return index_batch_loader(dataset, batch_size, shuffle, drop_last, self.trainer, self.images.seed)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        features, labels = batch
        return features.float(), labels
