"""norm: the head and the affine parameters (weight and bias) of every normalization layer of the backbone train
(BatchNorm, LayerNorm, GroupNorm, RMSNorm and timm's variants); everything else is frozen. BatchNorm running
statistics stay the pretrained ones by default (freeze_bn_stats=true: the base buffers come out of fit bitwise
unchanged); freeze_bn_stats=false lets them follow the new data (AdaBN-like), which the audit then allows."""

from __future__ import annotations

from torch import nn
from torch.nn.modules.batchnorm import _NormBase

from finetune.strategies.backbone_subset import BackboneSubset

TORCH_NORMS = tuple(t for t in (_NormBase, nn.LayerNorm, nn.GroupNorm, getattr(nn, "RMSNorm", None)) if t is not None)


def is_norm_layer(layer: nn.Module) -> bool:
    """torch's normalization layers and timm's own (timm.layers.norm, timm.layers.norm_act)."""
    return isinstance(layer, TORCH_NORMS) or type(layer).__module__.startswith("timm.layers.norm")


class NormTuning(BackboneSubset):
    name = "norm"
    chooses = "normalization layer with affine parameters"

    def selects(self, layer_name, layer, param_name) -> bool:
        return is_norm_layer(layer)
