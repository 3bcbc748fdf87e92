"""Random images held in memory as uint8 tensors: deterministic noise for tests and benchmarks at any scale.

Generated a block of 4,096 samples at a time from a generator seeded by (seed, split, block), so a sample depends
only on (seed, split, index), not on how many are made, and a million 8x8 images take about a second.
"""

from __future__ import annotations

import hashlib

import torch

from finetune.data.base import TensorImageDataModule

BLOCK = 4096


def block_seed(seed: int, split: str, block: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}|{split}|{block}".encode()).digest()[:8], "little") >> 1


def fake_samples(count: int, seed: int, split: str, native_size: int, num_classes: int):
    """(uint8 images [count, 3, S, S], int64 labels [count]); sample i is the same for any count > i."""
    images = torch.empty((count, 3, native_size, native_size), dtype=torch.uint8)
    labels = torch.empty(count, dtype=torch.int64)
    for block, start in enumerate(range(0, count, BLOCK)):
        stop = min(start + BLOCK, count)
        generator = torch.Generator().manual_seed(block_seed(seed, split, block))
        # a whole block is drawn even when fewer samples are needed, so the stream never depends on `count`
        pixels = torch.randint(0, 256, (BLOCK, 3, native_size, native_size), generator=generator, dtype=torch.uint8)
        targets = torch.randint(0, num_classes, (BLOCK,), generator=generator)
        images[start:stop], labels[start:stop] = pixels[:stop - start], targets[:stop - start]
    return images, labels


class FakeDataModule(TensorImageDataModule):
    def __init__(self, num_samples: int = 256, num_classes: int = 10, native_size: int = 32, split_seed: int = 0,
                 **kwargs):
        self._num_samples, self._num_classes, self.native_size = int(num_samples), int(num_classes), int(native_size)
        self.split_seed = int(split_seed)  # the samples; the training seed (seed) varies only the training
        super().__init__(**kwargs)

    @property
    def num_classes(self) -> int:
        return self._num_classes

    @property
    def dataset_id(self) -> dict:
        return {"name": "fake", "generator": f"torch.randint blocks of {BLOCK}", "num_samples": self._num_samples,
                "num_classes": self._num_classes, "native_size": self.native_size,
                "split_seed": self.split_seed}

    def load_splits(self):
        sizes = {"train": self._num_samples, "val": max(self._num_samples // 4, 1), "test": max(self._num_samples // 4, 1)}
        return {split: fake_samples(size, self.split_seed, split, self.native_size, self._num_classes)
                for split, size in sizes.items()}
