"""freeze: backbone parameters get requires_grad=False, all of them or only the submodules in `modules`.
Frozen parts stay in eval mode (BatchNorm running stats fixed, dropout and drop-path off) unless `train_bn`, which
keeps their BatchNorm layers alone training, affine and stats, as fastai does. Frozen parameters never reach the optimizer; gradients still flow through
frozen layers into trainable earlier ones, so a partial freeze trains the stem below a frozen middle."""

from __future__ import annotations

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from finetune.optim import backbone_part
from finetune.strategies.base import FreezingStrategy, names_under


class FreezeBackbone(FreezingStrategy):
    name = "freeze"

    def __init__(self, modules: list[str] | None = None, train_bn: bool = False):
        self.modules = list(modules) if modules else None
        self.train_bn = bool(train_bn)

    def frozen_roots(self, module) -> dict[str, nn.Module]:
        """The frozen submodules by their name in the LightningModule ('backbone', 'backbone.blocks.0', ...)."""
        if self.modules is None:
            return {"backbone": module.backbone}
        return {f"backbone.{name}": backbone_part(module, name, "strategy.modules") for name in self.modules}

    def _batchnorm_names(self, module) -> list[str]:
        return [f"{root}.{n}" if n else root for root, sub in self.frozen_roots(module).items()
                for n, m in sub.named_modules() if isinstance(m, _BatchNorm)]

    def prepare(self, module) -> None:
        trainable_bn = set(self._batchnorm_names(module)) if self.train_bn else set()
        for name, root in self.frozen_roots(module).items():
            for sub_name, sub in root.named_modules():
                full_name = f"{name}.{sub_name}" if sub_name else name
                if full_name in trainable_bn:
                    continue
                for param in sub.parameters(recurse=False):
                    param.requires_grad_(False)
        self.restore_eval_modes(module)

    def eval_modules(self, module) -> list[nn.Module]:
        # Everything frozen runs as in eval (dropout and drop-path off, also in the blocks that hold BatchNorm), except,
        # with train_bn, the BatchNorm layers themselves.
        return [m for root in self.frozen_roots(module).values() for m in root.modules()
                if not (self.train_bn and isinstance(m, _BatchNorm))]

    def frozen_names(self, module) -> set[str]:
        frozen = names_under(module, list(self.frozen_roots(module)))
        if self.train_bn:
            frozen -= names_under(module, self._batchnorm_names(module))
        return frozen
