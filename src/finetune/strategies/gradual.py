"""gradual: training in phases, each unfreezing more (`train`: head, backbone parts, or all; cumulative), each with its
own lr, per-part lr multipliers and schedule restart. In a phase, parts not yet unfrozen have requires_grad=False and
stay in eval mode (their BatchNorm too, unless train_bn); freeze_bn_stats keeps every BatchNorm on its pretrained
statistics (eval mode; affine weights still train once unfrozen). The optimizer holds, from the first step, every parameter that
trains in any phase, with per-group lrs that one scheduler drives (a frozen parameter gets no gradient, so the optimizer
skips it): nothing is added mid-run, so a resume restores the same groups and re-enters its epoch's phase, and DDP's
reducer, built while every part that will train requires grad, all-reduces each part from the step it unfreezes."""

from __future__ import annotations

import logging

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from finetune.errors import ConfigError
from finetune.run.lightning_internals import find_unused_parameters
from finetune.run.names import is_under, module_path, nested, under_any
from finetune.optim import backbone_layers, check_part_names
from finetune.strategies.base import FreezingStrategy, Phase, batchnorm_tensors, phase_field_names
from finetune.strategies.cached import CachedFeatures

log = logging.getLogger(__name__)


def parse_phases(phases: list[dict], key: str = "strategy.phases") -> list[Phase]:
    """Phases from config, each problem refused in one line that names the valid choices."""
    if not phases:
        raise ConfigError(f"{key} is empty; give at least one phase, e.g. [{{epochs: 1, train: [head]}}, "
                          f"{{epochs: null, train: [all]}}]")
    parsed = []
    for k, raw in enumerate(phases):
        where = f"{key}[{k}]"
        raw = dict(raw)
        unknown = sorted(set(raw) - set(phase_field_names()))
        if unknown:
            raise ConfigError(f"{where} has unknown key {unknown[0]!r}; valid keys: {', '.join(phase_field_names())}")
        train = raw.get("train") or []
        raw["train"] = [train] if isinstance(train, str) else [str(t) for t in train]
        raw["lr_mult"] = {str(p): float(m) for p, m in (raw.get("lr_mult") or {}).items()}
        phase = Phase(**raw)
        last = k == len(phases) - 1
        if phase.epochs is None and not last:
            raise ConfigError(f"{where}.epochs is null; only the last phase may run until the end of training")
        if phase.epochs is not None and int(phase.epochs) < 1:
            raise ConfigError(f"{where}.epochs={phase.epochs} must be a positive integer (or null in the last phase)")
        if phase.schedule not in ("restart", "continue") or (k == 0 and phase.schedule == "continue"):
            raise ConfigError(f"{where}.schedule={phase.schedule!r}; choose one of: restart, continue (not in the "
                              f"first phase: nothing to continue)")
        if phase.inputs not in ("images", "cached"):
            raise ConfigError(f"{where}.inputs={phase.inputs!r}; choose one of: images, cached")
        if phase.lr is not None and not float(phase.lr) > 0:
            raise ConfigError(f"{where}.lr={phase.lr} must be a positive number (or null for optimizer.lr)")
        if any(m < 0 for m in phase.lr_mult.values()):
            raise ConfigError(f"{where}.lr_mult={phase.lr_mult} needs multipliers of 0 or more")
        parsed.append(phase)
    if not parsed[0].train:
        raise ConfigError(f"{key}[0].train is empty; the first phase must unfreeze something, e.g. [head]")
    for k, phase in enumerate(parsed):
        unfrozen = [t for p in parsed[:k + 1] for t in p.train]
        if phase.inputs == "cached" and unfrozen != ["head"]:
            raise ConfigError(f"{key}[{k}].inputs=cached needs the head to be all that has unfrozen by then "
                              f"(has: {', '.join(unfrozen)}); stored features of a changing backbone would be stale")
    return parsed


def _refuse_overlaps(resolved: list[list[tuple[str, list[str]]]], key: str = "strategy.phases") -> None:
    """resolved[k]: (entry as written, the module-level roots it unfreezes) per train entry of phase k."""
    seen: list[tuple[int, str, list[str]]] = []
    for k, entries in enumerate(resolved):
        for entry, roots in entries:
            for earlier_k, earlier, earlier_roots in seen:
                if earlier == "all" or (entry != "all" and any(nested(a, b) for a in roots for b in earlier_roots)):
                    raise ConfigError(f"{key}[{k}].train entry {entry!r} overlaps {earlier!r} (phase {earlier_k}): "
                                      f"each part unfreezes once and stays unfrozen; list only what unfreezes then, "
                                      f"and `all` last, for whatever is left")
            seen.append((k, entry, roots))


def top_layers(backbone: nn.Module, count: int) -> list[list[str]]:
    """The modules (backbone-relative names) holding each of the top `count` layers, topmost first; layers as for
    optimizer.layer_decay (timm's group_matcher, or top-level children). A parameter the backbone holds directly
    (a ViT's cls_token) is named itself."""
    layer_of, _ = backbone_layers(backbone)
    layers: dict[int, list[str]] = {}
    for name, layer in layer_of.items():
        # the outermost module all of whose parameters are in this layer (a whole block, so its dropout and
        # drop-path train with it), else the parameter itself
        parts = name.split(".")
        owner = next((".".join(parts[:i]) for i in range(1, len(parts))
                      if all(layer_of.get(n) == layer for n in layer_of if is_under(n, ".".join(parts[:i])))),
                     name)
        if not under_any(owner, layers.setdefault(layer, [])):
            layers[layer].append(owner)
    return [layers[k] for k in sorted(layers, reverse=True)[:count]]


class GradualUnfreezing(FreezingStrategy):
    def __init__(self, phases: list[dict], train_bn: bool = False, keep_frozen: list[str] | None = None,
                 name: str = "gradual", freeze_bn_stats: bool = False, cache_dir: str = "feature_cache",
                 feature_dtype: str = "float32", extract_batch_size: int = 256, device_max_bytes: int = 4 * 1024**3,
                 shard_rows: int | None = None):
        self.name = name
        self.phase_list = parse_phases(phases)
        self.train_bn = bool(train_bn)
        self.freeze_bn_stats = bool(freeze_bn_stats)
        if self.train_bn and self.freeze_bn_stats:
            raise ConfigError("strategy.train_bn=true trains the statistics of frozen parts' BatchNorm and "
                              "strategy.freeze_bn_stats=true fixes every BatchNorm's statistics; choose one")
        self.keep_frozen = list(keep_frozen or [])
        self.cache = {"cache_dir": cache_dir, "feature_dtype": feature_dtype,
                      "extract_batch_size": int(extract_batch_size), "device_max_bytes": int(device_max_bytes),
                      "shard_rows": shard_rows}
        self.current_phase = 0
        # per phase, the NAMES of the modules kept in eval: Lightning replaces modules after prepare() (every
        # BatchNorm by a new SyncBatchNorm with trainer.sync_batchnorm=true), so objects held from then go stale
        self._modes: dict[int, list[str]] = {}

    def phases(self) -> list[Phase]:
        return self.phase_list

    def extract(self, backbone: nn.Module, inputs):
        return inputs if inputs.ndim == 2 else backbone(inputs)  # [B, D]: stored features of a cached phase

    # -- what trains when ----------------------------------------------------------------------------------------
    def _resolve(self, module, k: int, entry: str) -> list[str]:
        """The module-level roots a train entry unfreezes: head, all, a backbone part, or top:N (the top N layers)."""
        if entry == "all":
            return ["head", "backbone"]
        if entry == "head":
            return ["head"]
        if entry.startswith("top:"):
            count = entry[4:]
            if not count.isdigit() or int(count) < 1:
                raise ConfigError(f"strategy.phases[{k}].train entry {entry!r}: top:N needs a positive N, e.g. top:3")
            # top:N counts from the top of the backbone, so a later top:M unfreezes layers N+1..M
            done = max((int(e[4:]) for p in self.phase_list[:k] for e in p.train if e.startswith("top:")), default=0)
            layers = top_layers(module.backbone, int(count))[done:] if int(count) > done else None
            if layers is None:
                raise ConfigError(f"strategy.phases[{k}].train entry {entry!r} adds no layer: top:{done} are already "
                                  f"unfrozen; a later top:M needs M > {done}")
            return [f"backbone.{owner}" for layer in layers for owner in layer]
        check_part_names(module, [entry], f"strategy.phases[{k}].train", extra=("head", "all", "top:N"))
        return [f"backbone.{entry}"]

    def _roots(self, index: int) -> list[str]:
        """Module-level names unfrozen by phase `index` (cumulative)."""
        return [root for entries in self._resolved[:index + 1] for _, roots in entries for root in roots]

    def _trainable_in(self, module, index: int) -> set[str]:
        roots, kept = self._roots(index), [module_path(p) for p in self.keep_frozen]
        names = [n for n, _ in module.named_parameters()] + [n for n, _ in module.named_buffers()]
        trainable = {n for n in names if under_any(n, roots) and not under_any(n, kept)}
        if self.train_bn:  # BatchNorm of frozen parts trains in every phase, as with strategy=freeze train_bn=true
            trainable |= batchnorm_tensors(module)
        if self.freeze_bn_stats:  # every BatchNorm normalises with its pretrained statistics, which never move
            trainable -= batchnorm_tensors(module, parameters=False)
        return trainable

    def prepare(self, module) -> None:
        self._resolved = [[(entry, self._resolve(module, k, entry)) for entry in phase.train]
                          for k, phase in enumerate(self.phase_list)]
        _refuse_overlaps(self._resolved)
        check_part_names(module, self.keep_frozen, "strategy.modules", extra=())
        self.ever_trainable = set().union(*(self._trainable_in(module, k) for k in range(len(self.phase_list))))
        self.enter_phase(module, 0)

    def enter_phase(self, module, index: int) -> None:
        if getattr(self, "_entered", None) == index:
            return
        trainable = self._trainable_in(module, index)
        for name, param in module.named_parameters():
            param.requires_grad_(name in trainable)
        self.current_phase, self._entered = index, index
        if module.training:  # parts unfrozen now go back to train mode, those still frozen stay in eval
            module.train(True)
        else:
            self.restore_eval_modes(module)

    def before_wrap(self, module, trainer) -> None:
        self.check_epochs(trainer.max_epochs)
        if trainer.world_size > 1 and len(self.phase_list) > 1:
            # DDP registers what requires grad when it wraps: every part that will ever train, so a part unfrozen
            # later is all-reduced too; parts still frozen then produce no gradient, which find_unused_parameters
            # tolerates (and leaves their .grad None, so the optimizer skips them)
            for name, param in module.named_parameters():
                param.requires_grad_(name in self.ever_trainable)
            self._entered = None
            find_unused_parameters(trainer.strategy)

    def check_epochs(self, max_epochs: int | None) -> None:
        explicit = sum(p.epochs or 0 for p in self.phase_list)
        open_ended = self.phase_list[-1].epochs is None
        if max_epochs is None or max_epochs < 0:
            return
        if explicit > max_epochs or (open_ended and explicit >= max_epochs):
            raise ConfigError(f"strategy.phases need {explicit + open_ended} epochs or more but trainer.max_epochs="
                              f"{max_epochs}; raise trainer.max_epochs or shorten a phase")
        if not open_ended and explicit < max_epochs:
            raise ConfigError(f"strategy.phases cover {explicit} epochs but trainer.max_epochs={max_epochs}; set "
                              f"trainer.max_epochs={explicit}, or the last phase's epochs to null to run to the end")

    def trainable_parameters(self, module) -> list:
        """Every parameter that trains in any phase: the optimizer's groups never change during fit."""
        return [(n, p) for n, p in module.named_parameters() if n in self.ever_trainable]

    def never_trained_names(self, module) -> set[str]:
        names = {n for n, _ in module.named_parameters()} | {n for n, _ in module.named_buffers()}
        return names - self.ever_trainable

    def frozen_names(self, module) -> set[str]:
        """Frozen in the current phase (what the audit checks within it)."""
        names = {n for n, _ in module.named_parameters()} | {n for n, _ in module.named_buffers()}
        return names - self._trainable_in(module, self.current_phase)

    def eval_modules(self, module) -> list[nn.Module]:
        """Modules all of whose tensors are frozen in this phase, and which lie outside the unfrozen parts."""
        if self.current_phase not in self._modes:
            frozen = self.frozen_names(module)
            training_bn = batchnorm_tensors(module) if self.train_bn else set()
            roots = self._roots(self.current_phase)
            kept = [module_path(p) for p in self.keep_frozen]
            inside = lambda name: under_any(name, roots) and not under_any(name, kept)
            modes = []
            for mn, m in module.named_modules():
                if self.freeze_bn_stats and isinstance(m, _BatchNorm):
                    modes.append(mn)
                    continue
                if not mn or inside(mn) or (self.train_bn and isinstance(m, _BatchNorm)):
                    continue
                tensors = [f"{mn}.{n}" for n, _ in [*m.named_parameters(), *m.named_buffers()]]
                if all(t in frozen or t in training_bn for t in tensors):
                    modes.append(mn)
            self._modes[self.current_phase] = modes
        named = dict(module.named_modules())
        return [named[name] for name in self._modes[self.current_phase] if name in named]

    def phase_alone(self, index: int) -> GradualUnfreezing:
        """Phase `index` as a strategy of its own, from the first step, with what earlier phases unfroze trainable
        too: what the benchmark measures of a staged strategy (its steady-state cost in that phase)."""
        phase = self.phase_list[index]
        trained = [t for p in self.phase_list[:index + 1] for t in p.train]
        alone = {"train": trained, "lr": phase.lr, "lr_mult": phase.lr_mult, "inputs": phase.inputs,
                 "name": phase.name}
        return GradualUnfreezing([alone], self.train_bn, self.keep_frozen, f"{self.name}@{phase.name or index}",
                                 self.freeze_bn_stats, **self.cache)

    def wrap_datamodule(self, datamodule, module):
        if not any(p.inputs == "cached" for p in self.phase_list):
            return datamodule
        if all(p.inputs == "cached" for p in self.phase_list):
            return CachedFeatures(**self.cache).wrap_datamodule(datamodule, module)
        from finetune.data.features.cached import CachedFeatureDataModule
        from finetune.data.features.phased import PhaseInputs

        if getattr(datamodule, "has_random_train_augmentation", False):
            log.info("%s: the phases on cached features train with eval transforms; later phases use data.augment=%s",
                     self.name, datamodule.augment)
        features = CachedFeatureDataModule(datamodule, module, **self.cache)
        return PhaseInputs(datamodule, features, self)
