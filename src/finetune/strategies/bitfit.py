"""bitfit: the head and every bias of the backbone train (Ben Zaken et al., ACL 2022), e.g. BatchNorm's and
LayerNorm's shifts, a ViT's qkv/proj/fc biases; all weights are frozen. BatchNorm keeps its pretrained statistics
unless freeze_bn_stats=false. The optimizer sees about 0.1-1% of the backbone; compute is full fine-tuning's."""

from __future__ import annotations

from finetune.strategies.backbone_subset import BackboneSubset


class BitFit(BackboneSubset):
    name = "bitfit"
    chooses = "bias"

    def selects(self, layer_name, layer, param_name) -> bool:
        return param_name == "bias"
