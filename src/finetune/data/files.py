"""Datamodules over image files decoded by PIL: CPU transforms produce uint8 tensors at the final size, workers
with pinned memory and persistent processes feed the device, where normalisation runs."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2

from finetune.data.base import ImageDataModule
from finetune.data.preprocessing import eval_geometry


class FileImageDataModule(ImageDataModule):
    augmentations = ("none", "flip", "random_resized_crop")
    geometry = "crop"

    def transforms(self, train: bool) -> v2.Compose:
        if not train or self.augment == "none":
            return eval_geometry(self.preprocessing)
        if self.augment == "flip":
            return v2.Compose([eval_geometry(self.preprocessing), v2.RandomHorizontalFlip()])
        interpolation = InterpolationMode(self.preprocessing["interpolation"])
        return v2.Compose([v2.ToImage(), v2.RGB(), v2.RandomResizedCrop(self.image_size, interpolation=interpolation,
                                                                        antialias=True),
                           v2.RandomHorizontalFlip(), v2.ToDtype(torch.uint8)])

    def split_loader(self, split: str, batch_size: int, shuffle: bool, drop_last: bool = False) -> DataLoader:
        dataset: Dataset = self.split_dataset(split, train_transforms=shuffle and split == "train")
        workers = self.num_workers
        return DataLoader(dataset, batch_size=batch_size, sampler=self.sampler(len(dataset), shuffle),
                          drop_last=drop_last and len(dataset) > batch_size, num_workers=workers,
                          pin_memory=torch.cuda.is_available(), persistent_workers=workers > 0 and shuffle)
