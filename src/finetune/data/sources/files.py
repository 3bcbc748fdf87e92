"""Datamodules over image files. Two paths:

- PIL (default): DataLoader workers decode every image every epoch; CPU transforms produce uint8 tensors at the final
  size, each sample's augmentation seeded by (seed, epoch, index); the device normalises.
- the store (`data.store=true`): every image decoded once into memory-mapped uint8 shards (`image_store.py`), batches
  gathered by index, augmentation (random-resized-crop, flip) on the device, seeded the same way; a CPU run with
  DataLoader workers crops in the workers instead (its device is the CPU: a core each rather than one).

Both resume exactly mid-epoch: the epoch order is seeded, the batches already stepped are skipped, and a sample's
augmentation depends on (seed, epoch, index) only."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2

from finetune.data.base import (ImageDataModule, IndexBatchSampler, WorkerBatchLoader, index_batch_loader,
                                world_and_rank)
from finetune.data.storage.decode import DECODERS
from finetune.data.storage.device_augment import crop_boxes, uniform
from finetune.data.storage.image_store import AugmentedStoreBatches, ImageStore, RowSubset, StoredImages, augment_stored
from finetune.data.preprocessing import eval_geometry, eval_resize_size
from finetune.errors import ConfigError


class FileImageDataModule(ImageDataModule):
    augmentations = ("none", "flip", "random_resized_crop")
    geometry = "crop"

    def __init__(self, store: bool = False, store_size: int | None = None, store_dir: str | None = None,
                 store_decode: str = "auto", store_shard_rows: int | None = None, **kwargs):
        super().__init__(**kwargs)
        if store_size is not None and int(store_size) <= 0:
            raise ConfigError(f"data.store_size={store_size} must be a positive number of pixels, or null (the eval "
                              f"resize, floor(image_size / crop_pct))")
        if store_decode not in DECODERS:
            raise ConfigError(f"data.store_decode={store_decode!r} is not one of {', '.join(DECODERS)}")
        if store_shard_rows is not None and int(store_shard_rows) <= 0:
            raise ConfigError(f"data.store_shard_rows={store_shard_rows} must be a positive number of images, or null "
                              f"(about 256 MiB a shard)")
        self.store: ImageStore | None = None
        if store:
            self.store = ImageStore(self, store_dir or "logs/feature_cache", store_size, store_decode, store_shard_rows)

    def prepare_data(self) -> None:
        """One process: build the image store here. Under DDP, Lightning runs this on local rank 0 while the others
        wait in a barrier, so the store is built in setup instead, where every rank decodes its share."""
        if self.store is not None and world_and_rank(self.trainer)[0] == 1:
            self.store.prepare()

    @property
    def eval_resize(self) -> int:
        """The shorter side the eval transform resizes to before its centre crop."""
        return eval_resize_size(self.image_size, self.preprocessing["crop_pct"])

    def setup(self, stage: str | None = None) -> None:
        if self.store is not None and not self.store.entries:  # DDP, or a caller that skipped prepare_data (eval)
            distributed = self.trainer is not None and self.trainer.world_size > 1
            self.store.prepare(self.trainer.strategy if distributed else None)
        if self.store is not None and self.store.size < self.eval_resize:
            raise ConfigError(f"data.store_size={self.store.size} is smaller than the eval resize "
                              f"{self.eval_resize}; use null or more")

    @property
    def image_source(self) -> str | dict:
        """Where eval images come from, for the feature cache key: "files" also for a PIL-decoded store at the eval
        resize (its eval crops are the PIL path's pixels); a larger store resizes again, and another decoder may
        differ by a level, so those key their own features."""
        if self.store is None or (self.store.size == self.eval_resize and self.store.decoder == "pil"):
            return "files"
        return {"store_size": self.store.size, "decoder": self.store.decoder}

    def split_id(self, split: str) -> dict:
        """What identifies one split's images (the image store's key): the whole dataset's identity unless a subclass
        can tell the splits apart, so that a changed file in one split leaves the other splits' entries alone."""
        return self.dataset_id

    def _stored(self, split: str, crop: bool, pin_memory: bool = False) -> StoredImages:
        self.setup()
        return StoredImages(self.store.entries[split], self.image_size, self.eval_resize, crop, pin_memory,
                            self.preprocessing["interpolation"])

    def transforms(self, train: bool):
        """The eval geometry; for train the one SeededAugment of this datamodule (split_loader names each sample to
        it through SeededSamples), or the eval geometry with data.augment=none."""
        if not train or self.augment == "none":
            return eval_geometry(self.preprocessing)
        if getattr(self, "_train_augment", None) is None:
            self._train_augment = SeededAugment(self.augment, self.image_size, self.preprocessing)
        return self._train_augment

    def split_loader(self, split: str, batch_size: int, shuffle: bool, drop_last: bool = False):
        if self.store is not None:  # batches by index from the map; a train batch carries its indices to augment
            augment = shuffle and split == "train" and self.augment != "none"
            in_workers = augment and self.num_workers > 0 and self.training_device.type == "cpu"
            # batches pinned only when they go on to a GPU (not those the CPU workers crop)
            dataset = self._stored(split, crop=not augment, pin_memory=torch.cuda.is_available() and not in_workers)
            if in_workers:
                # training on the CPU: augment in the workers, a core each, rather than in this one process
                world, rank = world_and_rank(self.trainer)
                batches = IndexBatchSampler(len(dataset), batch_size, True, drop_last, world, rank, self.seed)
                return WorkerBatchLoader(AugmentedStoreBatches(dataset, self.seed, self.augment), batches, self.trainer,
                                         self.seed, num_workers=self.num_workers)
            return index_batch_loader(dataset, batch_size, shuffle, drop_last, self.trainer, self.seed)
        dataset: Dataset = self.split_dataset(split, train_transforms=shuffle and split == "train")
        workers = self.num_workers
        common = {"num_workers": workers, "pin_memory": torch.cuda.is_available()}
        if not shuffle:
            return DataLoader(dataset, batch_size=batch_size, sampler=self.eval_sampler(len(dataset)), **common)
        # training: the in-memory data's epoch order and mid-epoch resume, augmentation seeded per sample; workers
        # start each epoch (a DataLoader made before a restore would replay the epoch: WorkerBatchLoader)
        world, rank = world_and_rank(self.trainer)
        batches = IndexBatchSampler(len(dataset), batch_size, True, drop_last, world, rank, self.seed)
        augment = self.transforms(train=True) if split == "train" and self.augment != "none" else None
        return WorkerBatchLoader(dataset, batches, self.trainer, self.seed, augment, **common)

    def subset_loader(self, split: str, indices: torch.Tensor, batch_size: int):
        if self.store is None:
            return super().subset_loader(split, indices, batch_size)
        return index_batch_loader(RowSubset(self._stored(split, crop=True), indices), batch_size, shuffle=False)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        if len(batch) == 2:
            return super().on_after_batch_transfer(batch, dataloader_idx)
        images, labels, index = batch  # stored squares of a training batch (uint8): augment on the device
        epoch = self.trainer.current_epoch if self.trainer is not None else 0
        images = augment_stored(images, index, self.seed, epoch, self.augment, self.image_size, self.eval_resize,
                                self.preprocessing["interpolation"])
        return self.preprocess(images), labels


class SeededAugment:
    """The PIL path's training augmentation (random-resized-crop and flip, or the eval crop flipped) with the image
    store's draws (crop_boxes, uniform): a function of (seed, epoch, index), which SeededSamples sets in `sample`
    before each call. torchvision's random transforms would draw from the global RNG, which a per-sample reseed
    would take from dropout and drop-path (and torch.manual_seed would reseed CUDA's)."""

    def __init__(self, augment: str, size: int, preprocessing: dict):
        self.augment, self.size, self.preprocessing = augment, size, preprocessing
        self.sample: tuple[int, int, int] | None = None

    def __call__(self, image) -> torch.Tensor:
        if self.sample is None:
            raise RuntimeError("SeededAugment draws per sample: read the dataset through SeededSamples")
        seed, epoch, index = self.sample
        key = torch.tensor([index])
        if self.augment == "flip":  # as the store's augment_stored: the eval crop, flipped by draw 0
            image, flip = eval_geometry(self.preprocessing)(image), uniform(seed, epoch, key, 0) < 0.5
        else:
            image = v2.functional.to_dtype(v2.RGB()(v2.functional.to_image(image)), torch.uint8)
            top, left, height, width, flip = crop_boxes(seed, epoch, key, *image.shape[-2:])
            image = v2.functional.resized_crop(image, int(top), int(left), int(height), int(width),
                                               [self.size, self.size],
                                               InterpolationMode(self.preprocessing["interpolation"]), antialias=True)
        return v2.functional.horizontal_flip(image) if bool(flip) else image
