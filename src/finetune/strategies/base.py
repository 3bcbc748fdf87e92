"""The small interface every freezing strategy implements; the module and the freeze audit use nothing else.

The module asks a strategy how to prepare it, how to run the backbone, which parameters the optimizer gets and which
modules must stay in eval mode; the audit asks which parameters and buffers must come out of fit unchanged.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from lightning import LightningDataModule

    from finetune.module import FinetuneModule


class FreezingStrategy:
    name: str = "base"

    def prepare(self, module: FinetuneModule) -> None:
        """Once, before the optimizer is built: set requires_grad and the modes of frozen parts."""

    def extract(self, backbone: nn.Module, images: torch.Tensor) -> torch.Tensor:
        """How the backbone runs inside a training or evaluation step."""
        return backbone(images)

    def frozen_names(self, module: FinetuneModule) -> set[str]:
        """Names (as in named_parameters()/named_buffers()) that fit must leave bitwise unchanged."""
        return set()

    def eval_modules(self, module: FinetuneModule) -> list[nn.Module]:
        """Every module that stays in eval mode for the whole fit, whatever Lightning switches (containers and their
        children listed one by one, so a strategy can keep some children, e.g. BatchNorm, training)."""
        return []

    def trainable_parameters(self, module: FinetuneModule) -> list[tuple[str, nn.Parameter]]:
        """Exactly what the optimizer gets: every parameter that is not frozen."""
        frozen = self.frozen_names(module)
        return [(n, p) for n, p in module.named_parameters() if n not in frozen and p.requires_grad]

    def restore_eval_modes(self, module: FinetuneModule) -> None:
        """Called after every module.train(): frozen parts go back to eval mode. Each listed module is switched on its
        own (what .eval() does per module, without recursing into children the strategy keeps training)."""
        for frozen in self.eval_modules(module):
            frozen.training = False

    def wrap_datamodule(self, datamodule: LightningDataModule, module: FinetuneModule) -> LightningDataModule:
        """Where the training inputs come from; `cached` replaces images with stored features."""
        return datamodule

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({fields})"


def names_under(module: FinetuneModule, prefixes: list[str], *, parameters: bool = True,
                buffers: bool = True) -> set[str]:
    """Parameter and buffer names of `module` that live under any of the dotted `prefixes`."""
    named = []
    if parameters:
        named += [n for n, _ in module.named_parameters()]
    if buffers:
        named += [n for n, _ in module.named_buffers()]
    return {n for n in named if any(n == p or n.startswith(p + ".") for p in prefixes)}
