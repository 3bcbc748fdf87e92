"""The datamodule behind strategy=cached: it serves stored backbone features instead of images."""

from __future__ import annotations

import logging
import time

import torch
from lightning import LightningDataModule

from finetune.data.base import SPLITS, ImageDataModule, IndexBatchDataset, IndexBatchLoader, index_batch_loader
from finetune.data.feature_cache import FeatureCache, weights_digest

log = logging.getLogger(__name__)


@torch.inference_mode()
def extract_features(backbone: torch.nn.Module, images: ImageDataModule, split: str, batch_size: int,
                     device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Run the backbone once over a split (eval transforms, no augmentation, eval mode): detached features."""
    backbone.eval()
    features, labels = [], []
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    for batch_images, batch_labels in images.split_loader(split, batch_size, shuffle=False, shard=False):
        inputs = images.preprocess(batch_images.to(device, non_blocking=True))
        if device.type == "cuda":
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        with autocast:
            features.append(backbone(inputs).float().to(dtype))
        labels.append(torch.as_tensor(batch_labels))
    return {"features": torch.cat(features).cpu(), "labels": torch.cat(labels).cpu()}


class CachedFeatureDataModule(LightningDataModule):
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
            with self.cache.lock(key):
                tensors = self.cache.load(key)
                if tensors is None:
                    self.report["cache_hit"] = False
                    start = time.perf_counter()
                    backbone = self.module.backbone.to(device)
                    tensors = extract_features(backbone, self.images, split, self.extract_batch_size, device,
                                               self.dtype)
                    self.report["extract_seconds"] += time.perf_counter() - start
                    self.cache.save(key, tensors, identity)
                    log.info("feature cache miss: extracted %s %s in %.1fs -> %s", split,
                             tuple(tensors["features"].shape), time.perf_counter() - start, key)
                else:
                    log.info("feature cache hit: %s %s <- %s", split, tuple(tensors["features"].shape), key)
            self.splits[split] = tensors
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

    def train_dataloader(self) -> IndexBatchLoader:
        return self.split_loader("train", self.batch_size, shuffle=True, drop_last=True)

    def val_dataloader(self) -> IndexBatchLoader:
        return self.split_loader("val", self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> IndexBatchLoader:
        return self.split_loader("test", self.eval_batch_size, shuffle=False)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        features, labels = batch
        return features.float(), labels
