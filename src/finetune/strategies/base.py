"""The small interface every freezing strategy implements; the module and the freeze audit use nothing else.

The module asks a strategy how to prepare it, how to run the backbone, which parameters the optimizer gets and which
modules must stay in eval mode; the audit asks which parameters and buffers must come out of fit unchanged.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from finetune.run.names import under_any

if TYPE_CHECKING:
    from lightning import LightningDataModule

    from finetune.module import FinetuneModule


@dataclass
class Phase:
    """A stretch of training with one set of trainable parts. Single-phase strategies have one, for the whole fit."""
    epochs: int | None = None  # None: until the end of training (the last phase only)
    train: list[str] = field(default_factory=list)  # what unfreezes at its start: head, all, or backbone parts
    lr: float | None = None  # this phase's base lr; None: optimizer.lr
    lr_mult: dict[str, float] = field(default_factory=dict)  # per-part lr multipliers in this phase
    schedule: str = "restart"  # restart: the lr schedule starts afresh (warmup, cosine); continue: it goes on
    inputs: str = "images"  # cached: the head trains on stored features (only before any backbone part trains)
    name: str | None = None


def phase_field_names() -> list[str]:
    return [f.name for f in fields(Phase)]


class FreezingStrategy:
    name: str = "base"
    current_phase: int = 0

    def phases(self) -> list[Phase]:
        """The phases of a fit; staged strategies (gradual, lp_ft) have several."""
        return [Phase()]

    def phase_start_epochs(self) -> list[int]:
        """The epoch each phase starts at."""
        starts = [0]
        for phase in self.phases()[:-1]:
            starts.append(starts[-1] + (phase.epochs or 0))
        return starts

    def phase_at(self, epoch: int) -> int:
        """Which phase an epoch belongs to."""
        return max(bisect.bisect_right(self.phase_start_epochs(), epoch) - 1, 0)

    def enter_phase(self, module: FinetuneModule, index: int) -> None:
        """At every epoch start: make the parts of phase `index` trainable (a resumed run re-enters its phase)."""
        self.current_phase = index

    def before_wrap(self, module: FinetuneModule, trainer) -> None:
        """In setup, before the strategy wraps the model (DDP builds its reducer from what requires grad then)."""

    def prepare(self, module: FinetuneModule) -> None:
        """Once, before the optimizer is built: set requires_grad and the modes of frozen parts."""

    def extract(self, backbone: nn.Module, images: torch.Tensor) -> torch.Tensor:
        """How the backbone runs inside a training or evaluation step."""
        return backbone(images)

    def frozen_names(self, module: FinetuneModule) -> set[str]:
        """Names (as in named_parameters()/named_buffers()) that the current phase must leave bitwise unchanged."""
        return set()

    def never_trained_names(self, module: FinetuneModule) -> set[str]:
        """Frozen in every phase: what must still equal the model as built when fit ends (also across a resume)."""
        return self.frozen_names(module)

    def eval_modules(self, module: FinetuneModule) -> list[nn.Module]:
        """Every module that stays in eval mode for the whole fit, whatever Lightning switches (containers and their
        children listed one by one, so a strategy can keep some children, e.g. BatchNorm, training). Looked up in
        `module` at each call (a strategy may cache names, never module objects: Lightning swaps modules after
        prepare(), e.g. every BatchNorm for a SyncBatchNorm)."""
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

    def write_outputs(self, module: FinetuneModule, output_dir) -> dict:
        """After the test, with the tested weights loaded: files a strategy writes into the run folder (the peft
        strategies their adapter); returns what metrics.json should say about them."""
        return {}

    def plain_backbone(self, module: FinetuneModule) -> nn.Module:
        """The backbone as a plain model of its library, for export (a peft strategy merges its adapters into it)."""
        return module.backbone

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({fields})"


def names_under(module: FinetuneModule, prefixes: list[str], *, parameters: bool = True,
                buffers: bool = True) -> set[str]:
    """Parameter and buffer names of `module` that live under any of the dotted `prefixes`."""
    named = []
    if parameters:
        named += [n for n, _ in module.named_parameters()]
    if buffers:
        named += [n for n, _ in module.named_buffers()]
    return {n for n in named if under_any(n, prefixes)}


def batchnorm_tensors(module: nn.Module, parameters: bool = True) -> set[str]:
    """Names of every BatchNorm's buffers (running statistics) and, with `parameters`, its affine weights."""
    return {f"{mn}.{n}" for mn, m in module.named_modules() if isinstance(m, _BatchNorm)
            for n, _ in [*(m.named_parameters() if parameters else []), *m.named_buffers()]}
