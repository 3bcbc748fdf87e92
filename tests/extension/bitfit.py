"""An example of everything a user adds outside the package: a strategy, a backbone and a dataset.

The README's "Extending" section walks through these three; the tests train and audit them like the built-in ones.
"""

from __future__ import annotations

import torch
from torch import nn

from finetune.backbones import Backbone
from finetune.data.base import TensorImageDataModule
from finetune.strategies.base import FreezingStrategy, names_under


class BitFit(FreezingStrategy):
    """Train only the backbone's biases (and the head): BitFit, Ben Zaken et al. 2021. BN statistics are fixed."""

    name = "bitfit"

    def prepare(self, module) -> None:
        for name, param in module.backbone.named_parameters():
            param.requires_grad_(name.endswith("bias"))
        self.restore_eval_modes(module)

    def eval_modules(self, module) -> list[nn.Module]:
        return [m for m in module.backbone.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    def frozen_names(self, module) -> set[str]:
        return {n for n in names_under(module, ["backbone"]) if not n.endswith(".bias")}


def tiny_cnn(width: int = 16) -> Backbone:
    """Two conv layers with BatchNorm and global pooling; width is the feature size."""
    model = nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1, bias=True), nn.BatchNorm2d(width), nn.ReLU(),
        nn.Conv2d(width, width, 3, padding=1, bias=True), nn.BatchNorm2d(width), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
    )
    return Backbone(model=model, name=f"tiny_cnn_{width}", num_features=width,
                    data_config={"input_size": (3, 16, 16), "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)})


class BlobsDataModule(TensorImageDataModule):
    """Bright blob on the left or on the right half: two classes a tiny CNN separates."""

    def __init__(self, per_split: int = 64, **kwargs):
        self.per_split = per_split
        super().__init__(**kwargs)

    @property
    def num_classes(self) -> int:
        return 2

    @property
    def dataset_id(self) -> dict:
        return {"name": "blobs", "per_split": self.per_split, "seed": self.seed}

    def load_splits(self):
        generator = torch.Generator().manual_seed(self.seed)
        splits = {}
        for split in ("train", "val", "test"):
            labels = torch.randint(0, 2, (self.per_split,), generator=generator)
            images = torch.randint(0, 60, (self.per_split, 3, 16, 16), generator=generator, dtype=torch.uint8)
            for i, label in enumerate(labels.tolist()):
                images[i, :, 4:12, (2 if label == 0 else 10):(6 if label == 0 else 14)] = 250
            splits[split] = (images, labels)
        return splits
