"""Shared by the parameter-efficient strategies (bitfit, norm, lora): the head and a chosen subset of the backbone's
parameters train, every other backbone parameter is frozen (requires_grad=False, never in the optimizer) and every
BatchNorm keeps its pretrained running statistics (eval mode) unless `freeze_bn_stats` is false. Dropout and
drop-path run as in training: they regularise the parameters that train inside the backbone. Gradients flow through
the whole backbone (the chosen parameters sit everywhere in it), so compute and activation memory are full
fine-tuning's; the optimizer state and what a run must store are tiny."""

from __future__ import annotations

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from finetune.errors import ConfigError
from finetune.strategies.base import FreezingStrategy, batchnorm_tensors, names_under


class BackboneSubset(FreezingStrategy):
    chooses = "parameters"  # what `selects` picks, for the error when a backbone has none

    def __init__(self, freeze_bn_stats: bool = True):
        self.freeze_bn_stats = bool(freeze_bn_stats)

    def selects(self, layer_name: str, layer: nn.Module, param_name: str) -> bool:
        """Whether `layer_name`.`param_name` of the backbone trains."""
        raise NotImplementedError

    def trained_names(self, module) -> set[str]:
        """The backbone parameters this strategy trains, by their name in the module."""
        return {".".join(filter(None, ("backbone", layer_name, param_name)))
                for layer_name, layer in module.backbone.named_modules()
                for param_name, _ in layer.named_parameters(recurse=False)
                if self.selects(layer_name, layer, param_name)}

    def prepare(self, module) -> None:
        trained = self.trained_names(module)
        if not trained:
            raise ConfigError(f"strategy {self.name!r} found no {self.chooses} to train in backbone "
                              f"{module.backbone_name}; choose another strategy, e.g. freeze or full")
        for name, param in module.backbone.named_parameters(prefix="backbone"):
            param.requires_grad_(name in trained)
        self.restore_eval_modes(module)

    def eval_modules(self, module) -> list[nn.Module]:
        return [m for m in module.backbone.modules() if isinstance(m, _BatchNorm)] if self.freeze_bn_stats else []

    def frozen_names(self, module) -> set[str]:
        frozen = names_under(module, ["backbone"]) - self.trained_names(module)
        if not self.freeze_bn_stats:  # running statistics follow the data
            frozen -= batchnorm_tensors(module, parameters=False)
        return frozen
