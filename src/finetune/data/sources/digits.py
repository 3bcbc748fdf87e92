"""scikit-learn's bundled handwritten digits (1,797 8x8 grey images, 10 classes): real data that works offline."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.datasets import load_digits

from finetune.data.base import TensorImageDataModule
from finetune.data.sources.hold_out import check_fractions, hold_out


class DigitsDataModule(TensorImageDataModule):
    """Stratified train/val/test split with a fixed seed; grey becomes 3 channels and 8 px becomes
    `image_size` on the device."""

    def __init__(self, val_fraction: float = 0.15, test_fraction: float = 0.15, split_seed: int = 0, **kwargs):
        check_fractions(val_fraction, test_fraction)
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
        train_val, test = hold_out(labels, self.test_fraction, self.split_seed, "data.test_fraction",
                                   source="the digits")
        rest, held = hold_out(labels[train_val], self.val_fraction / (1 - self.test_fraction), self.split_seed,
                              "data.val_fraction", source="the digits", of_whole=1 - self.test_fraction)
        train, val = train_val[rest], train_val[held]
        return {name: (torch.from_numpy(images[idx]), torch.from_numpy(labels[idx]))
                for name, idx in (("train", train), ("val", val), ("test", test))}
