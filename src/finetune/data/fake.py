"""torchvision's FakeData, held in memory as uint8 tensors: deterministic random images for tests and benchmarks."""

from __future__ import annotations

import torch
from torchvision.datasets import FakeData
from torchvision.transforms.v2.functional import pil_to_tensor

from finetune.data.base import TensorImageDataModule


class FakeDataModule(TensorImageDataModule):
    def __init__(self, num_samples: int = 256, num_classes: int = 10, native_size: int = 32, **kwargs):
        self._num_samples, self._num_classes, self.native_size = int(num_samples), int(num_classes), int(native_size)
        super().__init__(**kwargs)

    @property
    def num_classes(self) -> int:
        return self._num_classes

    @property
    def dataset_id(self) -> dict:
        return {"name": "torchvision.FakeData", "num_samples": self._num_samples, "num_classes": self._num_classes,
                "native_size": self.native_size, "seed": self.seed}

    def load_splits(self):
        sizes = {"train": self._num_samples, "val": max(self._num_samples // 4, 1), "test": max(self._num_samples // 4, 1)}
        splits, offset = {}, self.seed * 1_000_003
        for split, size in sizes.items():
            fake = FakeData(size=size, image_size=(3, self.native_size, self.native_size),
                            num_classes=self._num_classes, random_offset=offset)
            offset += size
            images = torch.stack([pil_to_tensor(fake[i][0]) for i in range(size)])
            labels = torch.tensor([int(fake[i][1]) for i in range(size)], dtype=torch.int64)
            splits[split] = (images, labels)
        return splits
