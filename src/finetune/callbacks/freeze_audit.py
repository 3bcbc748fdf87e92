"""Proves, for every run, that the strategy froze exactly what it claims, in every phase.

When fit sets up it snapshots every parameter and buffer of the model as built (before any checkpoint is restored).
At the first batch of each phase (single-phase strategies have one, the whole fit) it snapshots them again and reads
what the phase freezes; during the phase it checks that frozen parameters never receive a gradient and frozen modules
stay in eval mode; when the phase ends it records what changed within it. At fit end it writes `param_audit.json`:
per name requires_grad, in_optimizer, changed (against the model as built), max_abs_delta and the phases it changed
in; one record per phase; and it fails the run on any violation.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from lightning import Callback


class FreezeViolationError(RuntimeError):
    pass


def _snapshot(module) -> dict[str, torch.Tensor]:
    return {name: t.detach().to("cpu", copy=True) for _, name, t in FreezeAudit._tensors(module)}


class FreezeAudit(Callback):
    def __init__(self, output_path: str | None = "param_audit.json", fail_on_violation: bool = True):
        self.output_path = output_path
        self.fail_on_violation = fail_on_violation
        self.report: dict | None = None

    def setup(self, trainer, module, stage: str) -> None:
        """The baseline is the model as built, before Lightning restores a checkpoint: a resumed run still proves its
        never-trained tensors equal their pretrained source, also across a kill."""
        if stage == "fit":
            self.initial = _snapshot(module)

    def on_fit_start(self, trainer, module) -> None:
        in_optimizer = {id(p) for opt in trainer.optimizers for group in opt.param_groups for p in group["params"]}
        self.in_optimizer = {n for n, p in module.named_parameters() if id(p) in in_optimizer}
        self.never_trained = module.strategy.never_trained_names(module)
        self.violations: list[str] = []
        self._reported: set[str] = set()  # per-step problems are reported once, not every step
        self.phases: list[dict] = []
        self._phase = None
        for name in sorted(self.never_trained & self.in_optimizer):
            self.violations.append(f"{name} is frozen but was handed to the optimizer")

    @staticmethod
    def _tensors(module):
        yield from (("parameters", n, p) for n, p in module.named_parameters())
        yield from (("buffers", n, b) for n, b in module.named_buffers())

    # -- phases ------------------------------------------------------------------------------------------------
    def _open_phase(self, trainer, module, index: int) -> None:
        strategy = module.strategy
        frozen = strategy.frozen_names(module)
        # trainable: what requires a gradient and is not frozen; each must be optimised, or it would take gradients
        # and never move
        trainable = {n for n, p in module.named_parameters() if p.requires_grad and n not in frozen}
        phase = strategy.phases()[index]
        names = {id(m): n for n, m in module.named_modules()}
        self._phase = {"index": index, "frozen": frozen, "start": _snapshot(module),
                       # flat lists so the per-step checks cost microseconds, not a walk of the module tree
                       "frozen_params": [(n, p) for n, p in module.named_parameters() if n in frozen],
                       "eval_modules": [(names.get(id(m), "?"), m) for m in strategy.eval_modules(module)]}
        self.phases.append({
            "phase": index, "name": phase.name, "start_epoch": trainer.current_epoch, "start_step": trainer.global_step,
            # the first phase of a resumed run began in an earlier process: "changed" covers only this process's part
            "resumed": not self.phases and trainer.ckpt_path is not None,
            "inputs": phase.inputs, "frozen": len(frozen), "trainable": len(trainable),
            "in_optimizer": len(self.in_optimizer), "trainable_numel": sum(p.numel() for n, p in
                                                                          module.named_parameters() if n in trainable)})
        for name in sorted(trainable - self.in_optimizer):
            self.violations.append(f"{name} is declared trainable but is not in the optimizer (phase {index})")

    def _close_phase(self, module) -> None:
        if self._phase is None:
            return
        record, start = self.phases[-1], self._phase["start"]
        changed = [name for _, name, t in self._tensors(module) if not torch.equal(start[name], t.detach().cpu())]
        record["changed"] = len(changed)
        record["changed_names"] = changed
        for name in changed:  # never-trained tensors are checked against the model as built at fit end
            if name in self._phase["frozen"] and name not in self.never_trained:
                self.violations.append(f"{name} is frozen in phase {record['phase']} but changed during it")
        self._phase = None

    def on_train_batch_start(self, trainer, module, batch, batch_idx: int) -> None:
        index = module.strategy.current_phase
        if self._phase is None or self._phase["index"] != index:
            self._close_phase(module)
            self._open_phase(trainer, module, index)
        for name, sub in self._phase["eval_modules"]:
            if sub.training and not self._seen(f"mode:{index}:{id(sub)}"):
                self.violations.append(f"{type(sub).__name__} {name or '<root>'} of a frozen part is in train "
                                       f"mode at step {trainer.global_step}")

    def on_before_optimizer_step(self, trainer, module, optimizer) -> None:
        for name, param in self._phase["frozen_params"] if self._phase else []:
            if param.grad is not None and not self._seen(f"grad:{name}"):
                self.violations.append(f"{name} is frozen but received a gradient at step {trainer.global_step}")

    def _seen(self, marker: str) -> bool:
        if marker in self._reported:
            return True
        self._reported.add(marker)
        return False

    # -- the report --------------------------------------------------------------------------------------------
    def on_fit_end(self, trainer, module) -> None:
        self._close_phase(module)
        changed_in = {}
        for record in self.phases:
            for name in record["changed_names"]:
                changed_in.setdefault(name, []).append(record["phase"])
        current_frozen = module.strategy.frozen_names(module)
        report: dict = {"strategy": module.strategy.name, "parameters": {}, "buffers": {}}
        for kind, name, tensor in self._tensors(module):
            before = self.initial[name]
            after = tensor.detach().cpu()
            changed = not torch.equal(before, after)
            delta = (after.double() - before.double()).abs().max().item() if after.numel() and changed else 0.0
            entry = {"changed": changed, "max_abs_delta": delta, "frozen": name in current_frozen,
                     "never_trained": name in self.never_trained, "changed_in_phases": changed_in.get(name, [])}
            if kind == "parameters":
                entry.update(requires_grad=tensor.requires_grad, in_optimizer=name in self.in_optimizer)
            report[kind][name] = entry
            if changed and name in self.never_trained:
                self.violations.append(f"{kind[:-1]} {name} is frozen but changed (max |delta| {delta:.3g})")
        report["phases"] = self.phases
        report["violations"] = self.violations
        report["summary"] = {
            "frozen": len(self.never_trained),
            "trainable": sum(1 for n, p in module.named_parameters() if n not in self.never_trained),
            "in_optimizer": len(self.in_optimizer),
            "changed_parameters": sum(e["changed"] for e in report["parameters"].values()),
            "phases": len(self.phases),
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
