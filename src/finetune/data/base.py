"""The datamodule contract: loaders yield (uint8 images, int64 labels); the device turns them into model inputs.

Keeping batches uint8 until they reach the device moves a quarter of the bytes of float32 and lets resize and
normalisation run on the GPU. Samplers are built here (not injected by Lightning) so that in-memory data can be
batched by index and every rank of a DDP run sees its own shard with the same epoch-seeded order.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from lightning import LightningDataModule
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Dataset, Sampler, SequentialSampler, Subset

from finetune.data.preprocessing import normalisation_tensors, to_model_input
from finetune.errors import ConfigError
from finetune.run.lightning_internals import batches_done

SPLITS = ("train", "val", "test")
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")


class IndexBatchSampler(Sampler):
    """Yields whole batches of indices as tensors: one randperm per epoch, sliced, never a Python list per sample.

    Training order matches torch's DistributedSampler (seed + epoch, padded by wrapping, then every world-th index),
    so one process and several see the same epoch permutation; Lightning calls set_epoch before each epoch. Without
    shuffling (evaluation) nothing is padded: each sample is counted once, on one rank, as with Lightning's
    UnrepeatedDistributedSampler.
    """

    def __init__(self, length: int, batch_size: int, shuffle: bool, drop_last: bool = False, world: int = 1,
                 rank: int = 0, seed: int = 0):
        self.length, self.batch_size, self.shuffle = length, batch_size, shuffle
        self.world, self.rank, self.seed, self.epoch = world, rank, seed, 0
        self.per_rank = math.ceil(length / world) if shuffle else len(range(rank, length, world))
        self.drop_last = drop_last and self.per_rank > batch_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def epoch_order(self) -> torch.Tensor:
        """Every index once, in this epoch's order (before padding and sharding)."""
        if self.shuffle:
            return torch.randperm(self.length, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        return torch.arange(self.length)

    def indices(self) -> torch.Tensor:
        order = self.epoch_order()
        padding = self.per_rank * self.world - self.length if self.shuffle else 0
        if padding:
            order = torch.cat([order, order[:padding].repeat(math.ceil(padding / max(len(order), 1)))[:padding]])
        return order[self.rank::self.world]

    def batches(self, device: torch.device | None = None) -> list[torch.Tensor]:
        """This epoch's batches of indices, copied to `device` in one transfer (not one per batch)."""
        batches = self.indices().to(device or "cpu").split(self.batch_size)
        if self.drop_last and len(batches[-1]) < self.batch_size:
            batches = batches[:-1]
        return list(batches)

    def __iter__(self):
        return iter(self.batches())

    def __len__(self) -> int:
        return self.per_rank // self.batch_size if self.drop_last else math.ceil(self.per_rank / self.batch_size)


class IndexBatchDataset(Dataset):
    """Tensors indexed a whole batch at a time: no per-sample collation."""

    def __init__(self, *tensors: torch.Tensor):
        self.tensors = tensors
        self.device = tensors[0].device

    def __len__(self) -> int:
        return len(self.tensors[0])

    def __getitem__(self, indices: torch.Tensor) -> tuple[torch.Tensor, ...]:
        index = torch.as_tensor(indices).to(self.device)
        return tuple(t[index] for t in self.tensors)


def world_and_rank(trainer) -> tuple[int, int]:
    return (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)


class IndexBatchLoader:
    """Batches sliced out of in-memory tensors by index: no workers, no per-sample collation, and resumable.

    After a restart mid-epoch, Lightning restores how many batches of the epoch were already stepped; the loader
    skips exactly those (the epoch's order is fixed by seed + epoch), so a killed and resumed run sees the same
    batches as an uninterrupted one.
    """

    batch_sampler = None  # read by Lightning's DataLoader introspection; `sampler` already yields whole batches

    def __init__(self, dataset: IndexBatchDataset, sampler: IndexBatchSampler, trainer=None):
        self.dataset, self.sampler, self.trainer = dataset, sampler, trainer

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self):
        # A generator: this body runs at the first next(), after Lightning has set the epoch and its progress.
        done = batches_done(self.trainer)
        # indices go to the data's device once an epoch: a host-to-device copy per batch would stall the GPU
        for position, index in enumerate(self.sampler.batches(self.dataset.device)):
            if position >= done:
                yield self.dataset[index]


class WorkerBatchLoader:
    """IndexBatchLoader's contract for datasets read sample by sample in DataLoader workers (image files): the
    epoch's batches in the sampler's seeded order, the ones already stepped skipped after a mid-epoch restart, each
    sample's augmentation seeded by (seed, epoch, index) (SeededSamples).

    The DataLoader is made at the first next() of each epoch: a multi-worker iterator draws its first batches when it
    is created, and Lightning creates the train iterator before it restores a checkpoint's progress (fit_loop.setup_data
    on Lightning 2.6), so one made earlier would replay the epoch from its start."""

    batch_sampler = None  # read by Lightning's DataLoader introspection; `sampler` orders the batches

    def __init__(self, dataset: Dataset, sampler: IndexBatchSampler, trainer=None, seed: int = 0, augment=None,
                 **loader_options):
        self.dataset, self.sampler, self.trainer, self.seed, self.augment = dataset, sampler, trainer, seed, augment
        self.loader_options = loader_options

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self):
        done, epoch = batches_done(self.trainer), self.sampler.epoch
        # the iterator's base seed (its workers' torch seeds) from its own generator: creating it leaves torch's
        # global stream, which dropout draws from, where it was
        options = {"generator": torch.Generator().manual_seed(self.seed + epoch), **self.loader_options}
        if getattr(self.dataset, "whole_batches", False):  # the dataset makes a whole batch from (indices, epoch)
            batches = [(batch, epoch) for batch in self.sampler.batches()[done:]]
            yield from DataLoader(self.dataset, sampler=batches, batch_size=None, **options)
            return
        batches = [[(index, epoch) for index in batch.tolist()] for batch in self.sampler.batches()[done:]]
        yield from DataLoader(SeededSamples(self.dataset, self.seed, self.augment), batch_sampler=batches, **options)


class SeededSamples(Dataset):
    """Item (index, epoch) of a dataset whose training transform is a SeededAugment: the sample is named to the
    transform before it runs, so its augmentation is a function of (seed, epoch, index) and no random state, global
    or CUDA, is read or changed. With augment=None the item is the dataset's own."""

    def __init__(self, dataset: Dataset, seed: int, augment=None):
        self.dataset, self.seed, self.augment = dataset, seed, augment

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        index, epoch = key
        if self.augment is None:
            return self.dataset[index]
        self.augment.sample = (self.seed, epoch, index)
        try:
            return self.dataset[index]
        finally:
            self.augment.sample = None


class SequentialIndexBatchSampler(IndexBatchSampler, SequentialSampler):
    """Batches in dataset order. It is a SequentialSampler, so Lightning's overfit_batches, which insists on one for
    every loader, takes it as it is instead of trying to rebuild the loader as a DataLoader."""


def index_batch_loader(dataset: IndexBatchDataset, batch_size: int, shuffle: bool, drop_last: bool = False,
                       trainer=None, seed: int = 0) -> IndexBatchLoader:
    world, rank = world_and_rank(trainer)
    sampler_type = IndexBatchSampler if shuffle else SequentialIndexBatchSampler
    sampler = sampler_type(len(dataset), batch_size, shuffle, drop_last, world, rank, seed)
    return IndexBatchLoader(dataset, sampler, trainer if shuffle else None)


class SplitLoaders(LightningDataModule):
    """Lightning's loader hooks in terms of `split_loader(split, batch_size, shuffle, drop_last)`."""

    batch_size: int
    eval_batch_size: int

    @property
    def training_device(self) -> torch.device:
        """Where the run trains (its root device), the CPU outside a trainer."""
        return self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")

    def train_dataloader(self):
        """One rule for every datamodule and rank (IndexBatchSampler): the last partial batch of a rank is dropped
        only when the rank has more than one batch; an epoch with no batch at all is refused in one line."""
        # Lightning's overfit_batches wants the same first batches every epoch: no shuffling, no augmentation
        overfitting = self.trainer is not None and self.trainer.overfit_batches > 0
        loader = self.split_loader("train", self.batch_size, shuffle=not overfitting, drop_last=True)
        if len(loader) == 0:
            world, rank = world_and_rank(self.trainer)
            raise ConfigError(f"the train split ({loader.sampler.length:,} samples) gives rank {rank} of {world} no "
                              f"batch: use fewer devices (trainer.devices) or more data")
        return loader

    def val_dataloader(self):
        return self.split_loader("val", self.eval_batch_size, shuffle=False)

    def test_dataloader(self):
        return self.split_loader("test", self.eval_batch_size, shuffle=False)

    def predict_dataloader(self):
        return self.test_dataloader()


class ImageDataModule(SplitLoaders):
    """Base of every image datamodule. Subclasses provide the splits, `num_classes` and `dataset_id`."""

    def __init__(self, batch_size: int = 64, eval_batch_size: int | None = None, num_workers: int = 0,
                 image_size: int | None = None, mean: list[float] | None = None, std: list[float] | None = None,
                 interpolation: str | None = None, crop_pct: float | None = None, augment: str | None = None,
                 seed: int = 0):
        super().__init__()
        for field, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size),
                             ("image_size", image_size)):
            if value is not None and int(value) <= 0:
                raise ConfigError(f"data.{field}={value} must be a positive integer")
        if num_workers < 0:
            raise ConfigError(f"data.num_workers={num_workers} must be 0 or more")
        if interpolation is not None and interpolation not in INTERPOLATIONS:
            raise ConfigError(f"data.interpolation={interpolation!r}; choose one of: {', '.join(INTERPOLATIONS)}")
        if augment is not None and augment not in self.augmentations:
            raise ConfigError(f"data.augment={augment!r}; choose one of: {', '.join(self.augmentations)}")
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(eval_batch_size or batch_size)
        self.num_workers = int(num_workers)
        # None: the datamodule's default, which a strategy that cannot use it (cached) may switch off
        self.augment_requested = augment is not None
        self.augment = augment or self.augmentations[-1]
        self.seed = int(seed)
        self._overrides = {"image_size": image_size, "mean": mean, "std": std, "interpolation": interpolation,
                           "crop_pct": crop_pct}
        self.preprocessing: dict[str, Any] = {}
        self.configure_preprocessing({})

    augmentations: tuple[str, ...] = ("none",)  # the last is the default
    geometry = "none"  # in-memory images at their native size; image files are resized and cropped (eval_geometry)

    def disable_augmentation(self) -> None:
        self.augment = "none"

    # -- what subclasses provide -------------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        raise NotImplementedError

    @property
    def dataset_id(self) -> dict:
        """Identity of the data and its split definition, for the feature cache key."""
        raise NotImplementedError

    def split_dataset(self, split: str, train_transforms: bool = False) -> Dataset:
        raise NotImplementedError

    def split_loader(self, split: str, batch_size: int, shuffle: bool, drop_last: bool = False) -> DataLoader:
        """A loader over one split (this rank's shard under DDP): train transforms only for a shuffled train split."""
        raise NotImplementedError

    def subset_loader(self, split: str, indices: torch.Tensor, batch_size: int):
        """Eval-transformed samples `indices` of a split, in that order (feature extraction uses it)."""
        return DataLoader(Subset(self.split_dataset(split), indices.tolist()), batch_size=batch_size,
                          num_workers=self.num_workers, pin_memory=torch.cuda.is_available())

    # -- preprocessing -----------------------------------------------------------------------------------------
    @property
    def has_random_train_augmentation(self) -> bool:
        return self.augment != "none"

    def configure_preprocessing(self, data_config: dict) -> None:
        """Take size, mean/std and interpolation from the backbone's metadata unless the config overrides them."""
        size = self._overrides["image_size"] or (data_config.get("input_size") or (3, 224, 224))[-1]
        mean = self._overrides["mean"] or data_config.get("mean") or (0.485, 0.456, 0.406)
        std = self._overrides["std"] or data_config.get("std") or (0.229, 0.224, 0.225)
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ConfigError(f"data.mean={list(mean)} / data.std={list(std)} need 3 values each, std positive")
        self.preprocessing = {
            "image_size": int(size),
            "mean": [float(m) for m in mean],
            "std": [float(s) for s in std],
            "interpolation": self._overrides["interpolation"] or data_config.get("interpolation") or "bilinear",
            "crop_pct": float(self._overrides["crop_pct"] or data_config.get("crop_pct") or 1.0),
        }

    @property
    def image_size(self) -> int:
        return self.preprocessing["image_size"]

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [B, 1|3, h, w] on any device -> normalised float [B, 3, S, S] on the same device."""
        return to_model_input(images, self.preprocessing, *self._normalisation(images.device))

    def _normalisation(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """mean/std as [1, 3, 1, 1] tensors on `device`, copied there once (a copy per batch would sync the GPU)."""
        key = (str(device), tuple(self.preprocessing["mean"]), tuple(self.preprocessing["std"]))
        if getattr(self, "_normalisation_key", None) != key:
            self._normalisation_tensors = normalisation_tensors(self.preprocessing, device)
            self._normalisation_key = key
        return self._normalisation_tensors

    @property
    def class_names(self) -> list[str]:
        """What each label means, stored in every checkpoint for prediction; the label numbers unless a subclass
        knows better (folder names, a dataset's `classes`)."""
        return [str(label) for label in range(self.num_classes)]

    def inference_preprocessing(self) -> dict[str, Any]:
        """Everything that turns an image file into this model's input (finetune.data.preprocessing)."""
        return {**self.preprocessing, "geometry": self.geometry}

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        images, labels = batch
        return self.preprocess(images), labels

    # -- loaders -----------------------------------------------------------------------------------------------
    def eval_sampler(self, length: int) -> UnrepeatedDistributedSampler:
        """Evaluation: in order, unpadded, under DDP this rank's share, so that no sample is counted twice."""
        world, rank = world_and_rank(self.trainer)
        return UnrepeatedDistributedSampler(range(length), num_replicas=world, rank=rank, shuffle=False)


class TensorImageDataModule(ImageDataModule):
    """Datasets small enough to hold as uint8 tensors: batches are sliced by index, no workers, no collation."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._splits: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None

    def load_splits(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """{split: (uint8 images [N, C, H, W], int64 labels [N])}."""
        raise NotImplementedError

    @property
    def splits(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        if self._splits is None:
            self._splits = self.load_splits()
            for split in SPLITS:
                if len(self._splits[split][0]) == 0:
                    raise ConfigError(f"{type(self).__name__}: the {split} split is empty")
        return self._splits

    def split_dataset(self, split: str, train_transforms: bool = False) -> IndexBatchDataset:
        return IndexBatchDataset(*self.splits[split])

    def subset_loader(self, split: str, indices: torch.Tensor, batch_size: int):
        dataset = IndexBatchDataset(*(t[indices] for t in self.splits[split]))
        return index_batch_loader(dataset, batch_size, shuffle=False)

    def split_loader(self, split: str, batch_size: int, shuffle: bool, drop_last: bool = False) -> IndexBatchLoader:
        return index_batch_loader(self.split_dataset(split), batch_size, shuffle, drop_last, self.trainer, self.seed)

    def steps_per_epoch(self) -> int:
        return math.floor(len(self.splits["train"][0]) / self.batch_size) or 1
