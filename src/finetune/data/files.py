"""Datamodules over image files decoded by PIL: CPU transforms produce uint8 tensors at the final size, workers
with pinned memory and persistent processes feed the device, where normalisation runs."""

from __future__ import annotations

import math

import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2

from finetune.data.base import ImageDataModule


def eval_resize_size(size: int, crop_pct: float) -> int:
    """The shorter side before the centre crop: timm's floor(size / crop_pct), tolerant of a crop_pct stored as
    crop / resize (224 / 232 must give back 232, not 231.99...)."""
    return math.floor(size / crop_pct + 1e-6)


class FileImageDataModule(ImageDataModule):
    augmentations = ("none", "flip", "random_resized_crop")

    def transforms(self, train: bool) -> v2.Compose:
        size = self.image_size
        interpolation = InterpolationMode(self.preprocessing["interpolation"])
        to_uint8 = [v2.ToImage(), v2.RGB()]
        if train and self.augment == "random_resized_crop":
            geometry = [v2.RandomResizedCrop(size, interpolation=interpolation, antialias=True),
                        v2.RandomHorizontalFlip()]
        else:
            resize = eval_resize_size(size, self.preprocessing["crop_pct"])
            geometry = [v2.Resize(resize, interpolation=interpolation, antialias=True), v2.CenterCrop(size)]
            if train and self.augment == "flip":
                geometry.append(v2.RandomHorizontalFlip())
        return v2.Compose(to_uint8 + geometry + [v2.ToDtype(torch.uint8)])

    def split_loader(self, split: str, batch_size: int, shuffle: bool, drop_last: bool = False) -> DataLoader:
        dataset: Dataset = self.split_dataset(split, train_transforms=shuffle and split == "train")
        workers = self.num_workers
        return DataLoader(dataset, batch_size=batch_size, sampler=self.sampler(len(dataset), shuffle),
                          drop_last=drop_last and len(dataset) > batch_size, num_workers=workers,
                          pin_memory=torch.cuda.is_available(), persistent_workers=workers > 0 and shuffle)
