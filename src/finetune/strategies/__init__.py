"""Freezing strategies: one short file each, sharing the interface in base.py."""

from finetune.strategies.backbone_subset import BackboneSubset
from finetune.strategies.base import FreezingStrategy, Phase
from finetune.strategies.bitfit import BitFit
from finetune.strategies.cached import CachedFeatures
from finetune.strategies.freeze import FreezeBackbone
from finetune.strategies.full import FullFinetune
from finetune.strategies.gradual import GradualUnfreezing
from finetune.strategies.lora import LoRA
from finetune.strategies.lp_ft import LinearProbeThenFinetune
from finetune.strategies.no_grad import NoGradBackbone
from finetune.strategies.norm import NormTuning
from finetune.strategies.peft_adapter import PeftAdapter

__all__ = ["FreezingStrategy", "Phase", "FullFinetune", "FreezeBackbone", "NoGradBackbone", "CachedFeatures",
           "GradualUnfreezing", "LinearProbeThenFinetune", "BackboneSubset", "BitFit", "NormTuning", "PeftAdapter",
           "LoRA"]
