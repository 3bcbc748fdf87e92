"""Freezing strategies: one short file each, sharing the interface in base.py."""

from finetune.strategies.base import FreezingStrategy, Phase
from finetune.strategies.cached import CachedFeatures
from finetune.strategies.freeze import FreezeBackbone
from finetune.strategies.full import FullFinetune
from finetune.strategies.gradual import GradualUnfreezing
from finetune.strategies.lp_ft import LinearProbeThenFinetune
from finetune.strategies.no_grad import NoGradBackbone

__all__ = ["FreezingStrategy", "Phase", "FullFinetune", "FreezeBackbone", "NoGradBackbone", "CachedFeatures",
           "GradualUnfreezing", "LinearProbeThenFinetune"]
