"""Decode once: every image of a split is decoded, resized and cropped once and stored as uint8 shards (the store of
`shard_store.py`, in the feature cache's folder), then served from the memory map; training augmentation runs on the
device (`device_augment.py`).

What is stored: the image resized so that its shorter side is `store_size` (default: the eval resize,
floor(image_size / crop_pct)), then a `store_size` square cut from its middle, placed so that the eval centre crop of
the square is exactly the crop the PIL path takes from the whole image (the same resize on the same decoded image,
the same pixels: eval from the store equals eval from the files). Training crops (random-resized-crop) are drawn from
that square, so on images far from square the sides beyond it are never seen; images are stored at one size, so the
store's disk cost is rows x 3 x store_size^2 bytes. Pixels are stored channels-last (H, W, 3): a batch gathered from
the map is a channels-last view, the layout torch's antialiased uint8 resize is fastest on (1.8x on the CPU).
"""

from __future__ import annotations

import logging
import time

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from finetune.data import preprocessing as preprocessing_module
from finetune.data.storage.decode import decode_device, decoded_batches
from finetune.data.storage.device_augment import random_resized_crop_flip, uniform
from finetune.data.features.cache import FeatureCache
from finetune.data.sources.file_listing import record_files
from finetune.data.storage.shard_store import Column, Entry, MappedEntry, default_rows_per_shard
from finetune.run.progress import Progress
from finetune.run.identity import package_version, source_digest
from finetune.data.storage.shard_build import build_across_ranks, finish_entry

log = logging.getLogger(__name__)


def centre_offset(length: int, crop: int) -> int:
    """Where torchvision's CenterCrop starts a crop of `crop` in `length` (its own rounding)."""
    return int(round((length - crop) / 2.0))


class StoreGeometry:
    """PIL image -> uint8 [3, store_size, store_size]: the shorter side resized to store_size (the eval transform's
    resize), then the square whose centre `image_size` crop is the eval transform's centre crop."""

    def __init__(self, preprocessing: dict, store_size: int):
        self.size, self.store_size = preprocessing["image_size"], store_size
        self.resize = v2.Compose([v2.ToImage(), v2.RGB(), v2.Resize(
            store_size, interpolation=InterpolationMode(preprocessing["interpolation"]), antialias=True)])

    def __call__(self, image) -> torch.Tensor:
        resized = self.resize(image)
        height, width = resized.shape[-2:]
        # the eval crop starts at centre_offset(h, S) in the whole image and at centre_offset(store, S) in the square
        top = min(max(centre_offset(height, self.size) - centre_offset(self.store_size, self.size), 0),
                  height - self.store_size)
        left = min(max(centre_offset(width, self.size) - centre_offset(self.store_size, self.size), 0),
                   width - self.store_size)
        return TF.crop(resized, top, left, self.store_size, self.store_size).as_subclass(torch.Tensor).to(torch.uint8)


def store_code_digest() -> str:
    return source_digest([__file__, preprocessing_module.__file__])


class StoredImages:
    """IndexBatchDataset's interface over a split's stored squares. `crop`: batches are the eval geometry (uint8
    [B, 3, S, S], labels); else the whole squares with their sample indices (uint8 [B, 3, s, s], labels, indices),
    which the device augments per sample."""

    device = torch.device("cpu")

    def __init__(self, entry: MappedEntry, image_size: int, eval_resize: int, crop: bool, pin_memory: bool = False,
                 interpolation: str = "bilinear"):
        self.entry, self.image_size, self.eval_resize, self.crop = entry, image_size, eval_resize, crop
        self.pin_memory, self.interpolation = pin_memory, interpolation

    def __len__(self) -> int:
        return len(self.entry)

    def __getitem__(self, indices: torch.Tensor):
        indices = torch.as_tensor(indices, dtype=torch.long).cpu()
        images = self.entry.gather("images", indices).permute(0, 3, 1, 2)  # stored HWC: a channels-last view
        labels = self.entry.gather("labels", indices, self.pin_memory)
        if not self.crop:
            return (images.pin_memory() if self.pin_memory else images), labels, indices
        return eval_crop(images, self.image_size, self.eval_resize, self.interpolation), labels


class AugmentedStoreBatches:
    """Training batches of the store augmented where they are gathered, in DataLoader workers: for a CPU run, whose
    device is the CPU, this spreads the per-sample crop and resize over the workers' cores instead of one process.
    Item (indices, epoch) -> (uint8 [B, 3, size, size], labels): the crops device augmentation would draw there, a
    function of (seed, epoch, index) only."""

    whole_batches = True

    def __init__(self, stored: StoredImages, seed: int, augment: str):
        self.stored, self.seed, self.augment = stored, seed, augment

    def __len__(self) -> int:
        return len(self.stored)

    def __getitem__(self, key: tuple[torch.Tensor, int]):
        indices, epoch = key
        images, labels, indices = self.stored[indices]
        return augment_stored(images, indices, self.seed, epoch, self.augment, self.stored.image_size,
                              self.stored.eval_resize, self.stored.interpolation), labels


def augment_stored(images: torch.Tensor, indices: torch.Tensor, seed: int, epoch: int, augment: str, size: int,
                   eval_resize: int, interpolation: str) -> torch.Tensor:
    """Stored squares (uint8, any device) -> the training crops: random-resized-crop and flip, or (augment=flip)
    the eval crop flipped per sample; each sample's draw a function of (seed, epoch, index)."""
    if augment == "random_resized_crop":
        return random_resized_crop_flip(images, indices, seed, epoch, size)
    images = eval_crop(images, size, eval_resize, interpolation)
    flip = uniform(seed, epoch, indices.to(images.device), 0) < 0.5
    return torch.where(flip[:, None, None, None], images.flip(-1), images)


class RowSubset:
    """A subset of a StoredImages, in the order of `indices` (feature extraction's shards)."""

    device = torch.device("cpu")

    def __init__(self, base: StoredImages, indices: torch.Tensor):
        self.base, self.indices = base, torch.as_tensor(indices, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, positions: torch.Tensor):
        return self.base[self.indices[torch.as_tensor(positions, dtype=torch.long).cpu()]]


def eval_crop(images: torch.Tensor, size: int, eval_resize: int, interpolation: str = "bilinear") -> torch.Tensor:
    """Stored squares -> the eval centre crop (uint8). A square stored at the eval resize is cropped, nothing else;
    a larger one is first resized to the eval resize (then within a level or so of the PIL path, not equal)."""
    if images.shape[-1] != eval_resize:
        smooth = interpolation != "nearest"
        images = F.interpolate(images.float(), size=(eval_resize, eval_resize), mode=interpolation, antialias=smooth,
                               align_corners=False if smooth else None).round_().clamp_(0, 255).to(torch.uint8)
    offset = centre_offset(images.shape[-1], size)
    return images[..., offset:offset + size, offset:offset + size].contiguous()


class ImageStore:
    """The decode-once entries of one datamodule: one per split, keyed by the files (paths, sizes, modification
    times), the stored size and resize method, and the code that stores them."""

    def __init__(self, datamodule, root: str, store_size: int | None = None, decoder: str = "auto",
                 shard_rows: int | None = None):
        self.datamodule, self.cache = datamodule, FeatureCache(root)
        self.store_size = int(store_size) if store_size else None
        self.shard_rows = int(shard_rows) if shard_rows else None
        self.decode_on = decode_device(decoder)
        self.entries: dict[str, MappedEntry] = {}
        self.report = {"images_decoded": 0, "store_build_seconds": 0.0, "store_hit": True}

    @property
    def size(self) -> int:
        return self.store_size or self.datamodule.eval_resize

    @property
    def decoder(self) -> str:
        """"pil" (DataLoader workers, the PIL path's own pixels) or "torchvision-<device>" (batched decode_jpeg)."""
        return "pil" if self.decode_on is None else f"torchvision-{self.decode_on.type}"

    def identity(self, split: str) -> dict:
        import PIL
        import torchvision

        p = self.datamodule.preprocessing
        return {"kind": "images", "dataset": self.datamodule.split_id(split), "split": split,
                "num_samples": len(self.datamodule.split_dataset(split)), "store_size": self.size,
                "image_size": p["image_size"], "interpolation": p["interpolation"],
                "geometry": "shorter side to store_size, the square aligned with the eval centre crop",
                "layout": "HWC", "decoder": self.decoder,
                "code": {"torchvision": torchvision.__version__, "pillow": PIL.__version__,
                         "finetune": package_version(), "source": store_code_digest()}}

    def prepare(self, strategy=None) -> None:
        """Build every split's entry that is missing or partial (a killed build resumes from its shards). Under DDP
        (`strategy`: Lightning's, of a world of several ranks), every rank calls this and decodes its share of the
        shards (shard_build.py), so no rank waits on another for more than about a shard."""
        for split in ("train", "val", "test"):
            self.entries[split] = self._open_or_build(split, strategy)

    def _open_or_build(self, split: str, strategy) -> MappedEntry:
        identity = self.identity(split)
        key = self.cache.key(identity)
        entry = self.cache.entry(key)
        rank = strategy.global_rank if strategy is not None else 0

        def build(shards: list[int]) -> None:
            self._build(entry, split, shards, rank)

        columns = {"images": Column("uint8", (self.size, self.size, 3)), "labels": Column("int64", ())}
        with self.cache.lock(key):  # a second process that needs this entry waits, then finds it built
            entry.create(identity, identity["num_samples"],
                         self.shard_rows or default_rows_per_shard(columns["images"].row_bytes), columns)
            valid = entry.valid_shards()
            if len(valid) < entry.num_shards and rank == 0:  # what `finetune-cache verify` checks the files against
                record_files(entry.folder, getattr(self.datamodule.split_dataset(split), "samples", None))
            if valid and len(valid) < entry.num_shards and rank == 0:
                log.info("resuming the image store of %s: %d of %d shards are there (%s)", split, len(valid),
                         entry.num_shards, entry.folder)
            if strategy is None or strategy.world_size == 1:
                build(sorted(set(range(entry.num_shards)) - set(valid)))
                finish_entry(entry, build)
                return entry.open()
        build_across_ranks(entry, valid, strategy, build)
        with self.cache.lock(key):
            finish_entry(entry, build)
        return entry.open()

    def _build(self, entry: Entry, split: str, shards: list[int], rank: int) -> None:
        if not shards:
            return
        self.report["store_hit"] = False
        start_time = time.perf_counter()
        geometry = StoreGeometry(self.datamodule.preprocessing, self.size)
        dataset = self.datamodule.split_dataset(split, transform=geometry)
        files = getattr(dataset, "samples", None) if self.decode_on is not None else None  # torchvision decodes files
        rows = sum(stop - start for start, stop in map(entry.shard_range, shards))
        share = "" if rows == entry.rows else f" (this rank's {rows:,} of {entry.rows:,})"
        with Progress(f"storing {split} images{share}", rows, unit="images", enabled=rank == 0) as progress:
            for shard in shards:
                start, stop = entry.shard_range(shard)
                images = torch.empty((stop - start, self.size, self.size, 3), dtype=torch.uint8)
                labels = torch.empty(stop - start, dtype=torch.int64)
                position = 0
                if files is not None:
                    loader = decoded_batches(files[start:stop], geometry, self.decode_on)
                else:
                    loader = DataLoader(Subset(dataset, range(start, stop)), batch_size=64,
                                        num_workers=self.datamodule.num_workers)
                for batch_images, batch_labels in loader:
                    images[position:position + len(batch_images)] = batch_images.permute(0, 2, 3, 1)
                    labels[position:position + len(batch_images)] = torch.as_tensor(batch_labels)
                    position += len(batch_images)
                    progress.advance(len(batch_images))
                entry.write_shard(shard, {"images": images.numpy(), "labels": labels.numpy()})
        self.report["images_decoded"] += rows
        self.report["store_build_seconds"] += time.perf_counter() - start_time
        log.info("image store: decoded %s %s images once into %d shards in %.1fs -> %s", f"{rows:,}", split,
                 len(shards), time.perf_counter() - start_time, entry.folder)
