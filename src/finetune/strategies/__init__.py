"""Freezing strategies: one short file each, sharing the interface in base.py."""

from finetune.strategies.base import FreezingStrategy
from finetune.strategies.cached import CachedFeatures
from finetune.strategies.freeze import FreezeBackbone
from finetune.strategies.full import FullFinetune
from finetune.strategies.no_grad import NoGradBackbone

__all__ = ["FreezingStrategy", "FullFinetune", "FreezeBackbone", "NoGradBackbone", "CachedFeatures"]
