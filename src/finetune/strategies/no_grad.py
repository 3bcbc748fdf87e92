"""no_grad: the backbone is a fixed feature extractor run under torch.no_grad() in eval mode. Its outputs carry no
grad_fn, so no graph is kept and nothing flows back; its parameters keep requires_grad=True (no_grad changes outputs,
not parameters) but never reach the optimizer, and DDP is told to ignore them so it needs no find_unused_parameters."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from finetune.strategies.base import FreezingStrategy, names_under


class NoGradBackbone(FreezingStrategy):
    name = "no_grad"

    def prepare(self, module) -> None:
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
            module, sorted(names_under(module, ["backbone"])))
        self.restore_eval_modes(module)

    def extract(self, backbone: nn.Module, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return backbone(images)

    def eval_modules(self, module) -> list[nn.Module]:
        return list(module.backbone.modules())

    def frozen_names(self, module) -> set[str]:
        return names_under(module, ["backbone"])
