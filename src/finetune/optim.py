"""Optimizer parameter groups and the learning-rate schedule.

Every group carries a real `lr` and a readable `name` (`head`, `blocks.6`, ... as Lightning's LearningRateMonitor
logs it: `lr/head`), and one torch LambdaLR drives every group in every phase: lr = the phase's lr x the group's
multiplier (layer decay, `optimizer.lr_mult`, the phase's `lr_mult`) x the schedule's shape at that step. No
`lr_scale` that only timm's own schedulers would read; nothing is added to the optimizer mid-run.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from finetune.errors import ConfigError
from finetune.run.names import part_for, relative_name, under_any


class WarmupCosine:
    """Linear warmup from 1% of each group's lr, then cosine decay to `min_lr_ratio` of it, stepped per batch; a
    schedule segment (the whole run, or one phase of a staged strategy) starts it afresh."""

    def __init__(self, warmup_fraction: float = 0.05, min_lr_ratio: float = 0.01):
        self.warmup_fraction, self.min_lr_ratio = float(warmup_fraction), float(min_lr_ratio)

    def __call__(self, step: int, length: int) -> float:
        length = max(int(length), 1)
        warmup = min(max(int(length * self.warmup_fraction), 1), length - 1) if length > 1 else 0
        if step < warmup:
            return 0.01 + 0.99 * step / warmup
        progress = min(step - warmup, length - warmup) / max(length - warmup, 1)
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * (1 + math.cos(math.pi * progress)) / 2


def constant(step: int, length: int) -> float:
    return 1.0


def backbone_layers(backbone: nn.Module) -> tuple[dict[str, int], list[str]]:
    """Layer index of every backbone parameter, from the stem (0) up, and a readable name per layer: timm's
    `group_matcher` where the model has one (stem, each block, the final conv), the top-level children otherwise."""
    from timm.models import group_parameters

    if hasattr(backbone, "group_matcher"):
        groups = list(group_parameters(backbone, backbone.group_matcher(coarse=False)).values())
    else:
        children = [n for n, _ in backbone.named_children()]
        groups = [[p for p, _ in backbone.named_parameters() if p.split(".")[0] == child] for child in children]
        groups = [g for g in groups if g]
    layer_of = {name: index for index, names in enumerate(groups) for name in names}
    return layer_of, [_common_name(names) for names in groups]


def _common_name(names: list[str]) -> str:
    """A readable name for a layer's parameters: per top-level module, the dotted prefix they share, joined with
    `+`: `blocks.5.3`, `conv_stem+bn1`, `blocks.6.0+conv_head+bn2`."""
    by_top: dict[str, list[list[str]]] = {}
    for name in names:
        by_top.setdefault(name.split(".")[0], []).append(name.split(".")[:-1] or [name])
    parts = []
    for paths in by_top.values():
        prefix = []
        for level in zip(*paths):
            if len(set(level)) > 1:
                break
            prefix.append(level[0])
        parts.append(".".join(prefix))
    return "+".join(parts)


def check_part_names(module: nn.Module, names: Iterable[str], key: str, extra: Sequence[str] = ("head",)) -> None:
    """Every name is `head` (or another of `extra`), `backbone`, or a backbone submodule; one line otherwise."""
    for name in names:
        if name not in extra and name != "backbone":
            backbone_part(module, name, key, extra)


def backbone_part(module: nn.Module, name: str, key: str, extra: Sequence[str] = ()) -> nn.Module:
    """The backbone submodule `name` (dotted) of the config entry `key`, or one line naming the choices."""
    try:
        return module.backbone.get_submodule(name)
    except AttributeError:
        children = ", ".join(n for n, _ in module.backbone.named_children())
        choices = (f"choices: {', '.join([*extra, 'backbone'])}, or a backbone part: {children}" if extra
                   else f"top-level choices: {children}")
        raise ConfigError(f"{key} entry {name!r} names no submodule of the backbone; {choices} (nested names use "
                          f"dots, e.g. blocks.0)") from None


def param_groups(module: nn.Module, named: list[tuple[str, nn.Parameter]], lr: float, weight_decay: float,
                 layer_decay: float | None = None, lr_mult: dict[str, float] | None = None,
                 phase_lr_mults: Sequence[dict[str, float]] = ({},)) -> tuple[list[dict], list[list[float]]]:
    """Parameter groups with a real `lr` and a readable `name`, and each group's multiplier in every phase.

    A parameter's lr is `lr` x its layer-decay factor (`layer_decay ** (layers - layer)`, the head being the top
    layer) or, where `lr_mult` names a part holding it, that multiplier instead. Phase multipliers (a staged
    strategy's per-phase `lr_mult`) stay out of the group's lr and go to the scheduler, which applies them per phase.
    Biases and norm weights (1-D), and what the backbone's `no_weight_decay()` names (timm: position embeddings and
    tokens), get no weight decay, in groups of their own (`<part>/no_decay`)."""
    lr_mult = dict(lr_mult or {})
    check_part_names(module, lr_mult, "optimizer.lr_mult")
    for mults in phase_lr_mults:
        check_part_names(module, mults, "strategy phase lr_mult")
    if layer_decay is not None and not 0 < float(layer_decay) <= 1:
        raise ConfigError(f"optimizer.layer_decay={layer_decay} must be in (0, 1]; null turns it off")
    layer_of, layer_names = backbone_layers(module.backbone) if layer_decay is not None else ({}, [])
    top = len(layer_names)  # the head's layer
    # what the model says must not decay (timm: a ViT's pos_embed, cls_token), as timm's own param-group helpers do
    no_decay = set(module.backbone.no_weight_decay()) if hasattr(module.backbone, "no_weight_decay") else set()
    groups: dict[tuple, dict] = {}
    for full_name, param in named:
        name = relative_name(full_name)
        in_backbone = full_name.startswith("backbone.")
        prefix = part_for(full_name, lr_mult)  # on full names: `head` is never the backbone's own head.*
        if prefix is not None:
            part, multiplier = prefix, float(lr_mult[prefix])
        elif in_backbone and name in layer_of:
            layer = layer_of[name]
            part, multiplier = layer_names[layer], float(layer_decay) ** (top - layer)
        else:
            part, multiplier = ("backbone" if in_backbone else "head"), 1.0
        phase_mults = tuple(_phase_multiplier(full_name, mults) for mults in phase_lr_mults)
        phase_part = max((part_for(full_name, m) or "" for m in phase_lr_mults), key=len)
        if len(phase_part) > len(part):
            part = phase_part  # a phase sets this part's lr apart: name the group after it
        decay = param.ndim > 1 and weight_decay > 0 and not (in_backbone and under_any(name, no_decay))
        key = (part, multiplier, phase_mults, decay)
        if key not in groups:
            groups[key] = {"params": [], "lr": lr * multiplier, "weight_decay": weight_decay if decay else 0.0,
                           "name": part if decay or weight_decay == 0 else f"{part}/no_decay"}
        groups[key]["params"].append(param)
    _unique_names(list(groups.values()))
    return list(groups.values()), [list(key[2]) for key in groups]


def _phase_multiplier(full_name: str, mults: dict[str, float]) -> float:
    part = part_for(full_name, mults)
    return float(mults[part]) if part is not None else 1.0


def _unique_names(groups: list[dict]) -> None:
    """LearningRateMonitor refuses two groups of one name; a part whose parameters got two multipliers gets `#2`."""
    seen: dict[str, int] = {}
    for group in groups:
        count = seen[group["name"]] = seen.get(group["name"], 0) + 1
        if count > 1:
            group["name"] = f"{group['name']}#{count}"


def phased_schedule(optimizer: torch.optim.Optimizer, total_steps: int, shape: Callable[[int, int], float],
                    phase_starts: Sequence[int] = (0,), phase_lr_ratios: Sequence[float] = (1.0,),
                    restarts: Sequence[bool] = (True,),
                    group_phase_mults: Sequence[Sequence[float]] | None = None) -> LambdaLR:
    """One LambdaLR for every group: at global step s in phase k, group g's lr is its own lr x phase_lr_ratios[k] x
    group_phase_mults[g][k] x shape(s - segment start, segment length). A segment starts at every phase that
    restarts the schedule and lasts until the next one (or `total_steps`). A pure function of the step, so a resumed
    run (Lightning restores the step count) gets the same lr at the same step."""
    total_steps = max(int(total_steps), 1)
    starts = list(phase_starts)
    segment_starts = [start for start, restart in zip(starts, restarts) if restart] or [0]
    if group_phase_mults is None:
        group_phase_mults = [[1.0] * len(starts) for _ in optimizer.param_groups]

    def phase_at(step: int) -> int:
        return max(bisect.bisect_right(starts, step) - 1, 0)

    def segment(step: int) -> tuple[int, int]:
        begin = max((s for s in segment_starts if s <= step), default=0)
        end = min((s for s in segment_starts if s > step), default=total_steps)
        return begin, max(min(end, total_steps) - begin, 1)

    def group_lambda(mults: Sequence[float]) -> Callable[[int], float]:
        def factor(step: int) -> float:
            k = phase_at(step)
            begin, length = segment(step)
            return phase_lr_ratios[k] * mults[k] * shape(step - begin, length)
        return factor

    return LambdaLR(optimizer, [group_lambda(m) for m in group_phase_mults])


def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int, warmup_fraction: float = 0.05,
                  min_lr_ratio: float = 0.01) -> LambdaLR:
    """The default schedule over one segment of `total_steps` (the benchmark's raw loop uses it as is)."""
    return phased_schedule(optimizer, total_steps, WarmupCosine(warmup_fraction, min_lr_ratio))
