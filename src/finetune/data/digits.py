"""scikit-learn's bundled handwritten digits (1,797 8x8 grey images, 10 classes): real data that works offline."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from finetune.data.base import TensorImageDataModule
from finetune.errors import ConfigError


class DigitsDataModule(TensorImageDataModule):
    """Stratified train/val/test split with a fixed seed; grey becomes 3 channels and 8 px becomes
    `image_size` on the device."""

    def __init__(self, val_fraction: float = 0.15, test_fraction: float = 0.15, split_seed: int = 0, **kwargs):
        if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
            raise ConfigError(f"data.val_fraction={val_fraction} and data.test_fraction={test_fraction} must be "
                              f"in (0, 1) and sum to less than 1")
        self.val_fraction, self.test_fraction, self.split_seed = val_fraction, test_fraction, split_seed
        super().__init__(**kwargs)

    @property
    def num_classes(self) -> int:
        return 10

    @property
    def dataset_id(self) -> dict:
        return {"name": "sklearn.load_digits", "val_fraction": self.val_fraction,
                "test_fraction": self.test_fraction, "split_seed": self.split_seed}

    def load_splits(self):
        digits = load_digits()
        # Pixel values are 0..16; scale to the 0..255 range of an ordinary uint8 image.
        images = np.round(digits.images * (255 / 16)).astype(np.uint8)[:, None]
        labels = digits.target.astype(np.int64)
        index = np.arange(len(labels))
        train_val, test = train_test_split(index, test_size=self.test_fraction, stratify=labels,
                                           random_state=self.split_seed)
        val_share = self.val_fraction / (1 - self.test_fraction)
        train, val = train_test_split(train_val, test_size=val_share, stratify=labels[train_val],
                                      random_state=self.split_seed)
        return {name: (torch.from_numpy(images[idx]), torch.from_numpy(labels[idx]))
                for name, idx in (("train", train), ("val", val), ("test", test))}
