"""Proves, for every run, that the strategy froze exactly what it claims.

When fit sets up it snapshots every parameter and buffer of the model as built (before any checkpoint is restored);
at fit start it reads the optimizer's parameter set; during fit it checks that frozen parameters never receive a
gradient and frozen modules stay in eval mode; at fit end it writes `param_audit.json` (requires_grad, in_optimizer,
changed, max_abs_delta per name, against the model as built) and fails the run on any violation.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from lightning import Callback


class FreezeViolationError(RuntimeError):
    pass


class FreezeAudit(Callback):
    def __init__(self, output_path: str | None = "param_audit.json", fail_on_violation: bool = True):
        self.output_path = output_path
        self.fail_on_violation = fail_on_violation
        self.report: dict | None = None

    def setup(self, trainer, module, stage: str) -> None:
        """The baseline is the model as built, before Lightning restores a checkpoint: a resumed run still proves its
        frozen tensors equal their pretrained source, also across a kill."""
        if stage == "fit":
            self.initial = {name: t.detach().to("cpu", copy=True) for _, name, t in self._tensors(module)}

    def on_fit_start(self, trainer, module) -> None:
        self.frozen = module.strategy.frozen_names(module)
        # trainable: what requires a gradient and is not frozen; each must be optimised, or it would take gradients
        # and never move
        self.trainable = {n for n, p in module.named_parameters() if p.requires_grad and n not in self.frozen}
        in_optimizer = {id(p) for opt in trainer.optimizers for group in opt.param_groups for p in group["params"]}
        self.in_optimizer = {n for n, p in module.named_parameters() if id(p) in in_optimizer}
        # flat lists so the per-step checks cost a few microseconds, not a walk of the module tree
        self.frozen_params = [(n, p) for n, p in module.named_parameters() if n in self.frozen]
        names = {id(m): n for n, m in module.named_modules()}
        self.eval_modules = [(names.get(id(m), "?"), m) for m in module.strategy.eval_modules(module)]
        self.violations: list[str] = []
        self._reported: set[str] = set()  # per-step problems are reported once, not every step
        for name in sorted(self.trainable - self.in_optimizer):
            self.violations.append(f"{name} is declared trainable but is not in the optimizer")
        for name in sorted(self.frozen & self.in_optimizer):
            self.violations.append(f"{name} is frozen but was handed to the optimizer")

    @staticmethod
    def _tensors(module):
        yield from (("parameters", n, p) for n, p in module.named_parameters())
        yield from (("buffers", n, b) for n, b in module.named_buffers())

    def on_before_optimizer_step(self, trainer, module, optimizer) -> None:
        for name, param in self.frozen_params:
            if param.grad is not None and not self._seen(f"grad:{name}"):
                self.violations.append(f"{name} is frozen but received a gradient at step {trainer.global_step}")

    def on_train_batch_start(self, trainer, module, batch, batch_idx: int) -> None:
        for name, sub in self.eval_modules:
            if sub.training and not self._seen(f"mode:{id(sub)}"):
                self.violations.append(f"{type(sub).__name__} {name or '<root>'} of a frozen part is in train "
                                       f"mode at step {trainer.global_step}")

    def _seen(self, marker: str) -> bool:
        if marker in self._reported:
            return True
        self._reported.add(marker)
        return False

    def on_fit_end(self, trainer, module) -> None:
        report: dict = {"strategy": module.strategy.name, "parameters": {}, "buffers": {}}
        for kind, name, tensor in self._tensors(module):
            before = self.initial[name]
            after = tensor.detach().cpu()
            changed = not torch.equal(before, after)
            delta = (after.double() - before.double()).abs().max().item() if after.numel() and changed else 0.0
            entry = {"changed": changed, "max_abs_delta": delta, "frozen": name in self.frozen}
            if kind == "parameters":
                entry.update(requires_grad=tensor.requires_grad, in_optimizer=name in self.in_optimizer)
            report[kind][name] = entry
            if changed and name in self.frozen:
                self.violations.append(f"{kind[:-1]} {name} is frozen but changed (max |delta| {delta:.3g})")
        report["violations"] = self.violations
        report["summary"] = {
            "frozen": len(self.frozen), "trainable": len(self.trainable), "in_optimizer": len(self.in_optimizer),
            "changed_parameters": sum(e["changed"] for e in report["parameters"].values()),
        }
        self.report = report
        if self.output_path and trainer.is_global_zero:
            path = Path(self.output_path)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(report, indent=1))
        if self.violations and self.fail_on_violation:
            raise FreezeViolationError(f"freeze audit failed for strategy={module.strategy.name}: "
                                       + "; ".join(self.violations[:5])
                                       + (f" (+{len(self.violations) - 5} more)" if len(self.violations) > 5 else ""))
