"""An example of everything a user adds outside the package: two parameter-efficient strategies, a backbone and a
dataset.

The README's "Extending" section walks through them; tests/test_extension.py trains and audits them like the built-in
ones.
"""

from __future__ import annotations

import torch
from torch import nn

from finetune.backbones import Backbone
from finetune.data.base import TensorImageDataModule
from finetune.strategies import BackboneSubset, PeftAdapter


class LoHa(PeftAdapter):
    """LoHa (Hyeon-Woo et al., ICLR 2022: a Hadamard product of two low-rank pairs) from peft, on the layers named in
    target_modules: the template's peft base injects it, audits it, merges it and saves the adapter alone."""

    name = "loha"
    chooses = "layer for LoHa"
    adapts = (nn.Linear, nn.Conv2d)

    def __init__(self, target_modules="auto", r: int = 4, alpha: float = 4):
        super().__init__(target_modules)
        self.r, self.alpha = r, alpha

    def adapter_config(self, targets):
        from peft import LoHaConfig

        return LoHaConfig(r=self.r, alpha=self.alpha, target_modules=targets)


class AttentionOnly(BackboneSubset):
    """Only a ViT's attention layers train (Touvron et al., ECCV 2022, "Three things everyone should know about
    Vision Transformers"): one rule over the backbone's parameters."""

    name = "attention_only"
    chooses = "attention layer"

    def selects(self, layer_name, layer, param_name) -> bool:
        return ".attn." in f".{layer_name}."


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
