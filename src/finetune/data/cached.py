"""The datamodule behind strategy=cached: it serves stored backbone features instead of images."""

from __future__ import annotations

import logging
import math
import time

import torch

from finetune.data.base import (SPLITS, ImageDataModule, IndexBatchDataset, IndexBatchLoader, SplitLoaders,
                                index_batch_loader, world_and_rank)
from finetune.data.feature_cache import FeatureCache, weights_digest

log = logging.getLogger(__name__)


@torch.inference_mode()
def extract_features(backbone: torch.nn.Module, images: ImageDataModule, split: str, indices: torch.Tensor,
                     batch_size: int, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Run the backbone once over samples `indices` of a split (eval transforms, eval mode, inference mode, bf16
    autocast on a GPU): features with no graph, stored as `dtype`, in the order of `indices`."""
    backbone.eval()
    features, labels = [], []
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    for batch_images, batch_labels in images.subset_loader(split, indices, batch_size):
        inputs = images.preprocess(batch_images.to(device, non_blocking=True))
        if device.type == "cuda":
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        with autocast:
            features.append(backbone(inputs).float().to(dtype))
        labels.append(torch.as_tensor(batch_labels).to(device))
    return {"features": torch.cat(features), "labels": torch.cat(labels)}


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
        self.report = {"extract_seconds": 0.0, "cache_hit": True, "cache_keys": {}}

    @property
    def num_classes(self) -> int:
        return self.images.num_classes

    def identity(self, split: str, digest: str) -> dict:
        return {"backbone": self.module.backbone_name, "weights": digest,
                "preprocessing": self.images.preprocessing, "dataset": self.images.dataset_id, "split": split,
                "num_samples": len(self.images.split_dataset(split)), "dtype": str(self.dtype)}

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        device = self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")
        digest = weights_digest(self.module.backbone)
        for split in SPLITS:
            identity = self.identity(split, digest)
            key = self.cache.key(identity)
            self.report["cache_keys"][split] = key
            self.splits[split] = self._load_or_extract(split, key, identity, device)
        self._place(device)

    def _load_or_extract(self, split: str, key: str, identity: dict, device: torch.device) -> dict:
        world, rank = world_and_rank(self.trainer)
        if world == 1:
            with self.cache.lock(key):  # a second process building the same entry waits, then finds it
                tensors = self.cache.load(key)
                if tensors is None:
                    tensors = self._extract(split, key, identity, device, world, rank)
                else:
                    log.info("feature cache hit: %s %s <- %s", split, tuple(tensors["features"].shape), key)
            return tensors
        # Several ranks: rank 0 looks, every rank extracts its share on a miss, rank 0 writes, the others wait.
        strategy = self.trainer.strategy
        tensors = self.cache.load(key) if rank == 0 else None
        if strategy.broadcast(tensors is not None, src=0):
            tensors = tensors if tensors is not None else self.cache.load(key)
            log.info("feature cache hit: %s <- %s (rank %d)", split, key, rank)
            return tensors
        tensors = self._extract(split, key, identity, device, world, rank)
        strategy.barrier("feature_cache_written")
        return tensors

    def _extract(self, split: str, key: str, identity: dict, device: torch.device, world: int, rank: int) -> dict:
        self.report["cache_hit"] = False
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
        if rank == 0:
            self.cache.save(key, tensors, identity)
        log.info("feature cache miss: extracted %s %s in %.1fs -> %s", split, tuple(tensors["features"].shape),
                 time.perf_counter() - start, key)
        return tensors

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
