"""K linear heads as one stacked weight and bias, and an optimizer that steps all K at once.

torch.optim steps one param group at a time (80-100 us a group on a CPU, fused or not), and a grid's heads need a
group each per decay setting, so a wide grid of tiny linear heads spent most of a step in that loop. Here the K
heads' weights are one tensor [K, classes, features] (nn.Linear's layout, so the logits are the same one matmul as
over the concatenated heads) and their biases one [K, classes]; each head's lr and weight decay are [K] tensors
broadcast over the stack, and every update is a handful of element-wise ops over the whole stack.

`StackedHeadOptimizer` mirrors, operation for operation and in the same order, the CPU default (single-tensor)
kernels of the installed torch:

- torch.optim.AdamW and Adam: `torch.optim.adam._single_tensor_adam` (AdamW is Adam with decoupled_weight_decay:
  `param *= 1 - lr * wd` before the moments; Adam adds `wd * param` to the gradient), bias correction
  `1 - beta ** step`, `denom = sqrt(v) / sqrt(1 - beta2 ** step) + eps`, amsgrad's running max, maximize;
- torch.optim.SGD: `torch.optim.sgd._single_tensor_sgd` (L2 decay into the gradient, momentum buffer started from
  the first gradient, dampening, nesterov, maximize).

The per-head scalars (lr x the schedule's factor, step size, decay factor) are computed in double, as the scalar
kernels compute them in Python, and rounded once to the parameters' dtype, so each head's update is torch's for that
head alone up to, at most, rounding (on a CPU, float32: the same bits in the tests). Any other optimizer class or
option (a tensor beta, differentiable, capturable) is not mirrored: `stackable` says so, and the grid then keeps
torch.optim with a group per head.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

STACKABLE = (torch.optim.AdamW, torch.optim.Adam, torch.optim.SGD)


class StackedLinear(nn.Module):
    """K Linear layers of one shape: weight [K, out, in], bias [K, out]; forward gives [batch, K, out]."""

    def __init__(self, linears: list[nn.Linear]):
        super().__init__()
        self.weight = nn.Parameter(torch.stack([linear.weight.detach() for linear in linears]))
        self.bias = nn.Parameter(torch.stack([linear.bias.detach() for linear in linears]))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        count, classes = self.bias.shape
        return F.linear(features, self.weight.flatten(0, 1), self.bias.flatten()).view(len(features), count, classes)


def probe(factory) -> torch.optim.Optimizer:
    """cfg.optimizer's instance over one throwaway parameter: its class and every default (betas, eps, momentum)."""
    return factory([nn.Parameter(torch.zeros(1))])


def stackable(optimizer: torch.optim.Optimizer) -> str | None:
    """None when StackedHeadOptimizer mirrors this optimizer's class and settings; else why not, in a few words."""
    if type(optimizer) not in STACKABLE:
        return f"{type(optimizer).__module__}.{type(optimizer).__qualname__} is not AdamW, Adam or SGD"
    defaults = optimizer.defaults
    for option in ("differentiable", "capturable"):
        if defaults.get(option):
            return f"{option}=True"
    if any(isinstance(beta, torch.Tensor) for beta in defaults.get("betas", ())):
        return "a tensor beta"
    return None


class StackedHeadOptimizer(torch.optim.Optimizer):
    """AdamW, Adam or SGD (the class and settings of `template`, see `stackable`) over a StackedLinear's weight and
    bias, with head k's lr and weight decay `weight_lr[k]`, `weight_decay[k]` for its weight and `bias_lr[k]`,
    `bias_decay[k]` for its bias. One param group, whose `lr` is the schedule's factor (1.0 until a scheduler sets
    it): a LambdaLR over this optimizer scales every head's lr by the factor of the step, as it scales each group's
    in the real run."""

    def __init__(self, stacked: StackedLinear, template: torch.optim.Optimizer, weight_lr, weight_decay, bias_lr,
                 bias_decay):
        reason = stackable(template)
        if reason is not None:
            raise ValueError(f"cannot step the heads stacked: {reason}")
        # lr and decay are per head; foreach and fused choose kernels this class does not use
        settings = {k: v for k, v in template.defaults.items()
                    if k not in ("lr", "weight_decay", "foreach", "fused")}
        super().__init__([stacked.weight, stacked.bias], {**settings, "lr": 1.0})
        self.kind = "sgd" if isinstance(template, torch.optim.SGD) else "adam"
        # AdamW sets decoupled_weight_decay=True in its defaults; older torch has no such key on AdamW
        self.decoupled = bool(settings.get("decoupled_weight_decay", isinstance(template, torch.optim.AdamW)))
        # [2, K] doubles: row 0 the heads' weights, row 1 their biases
        self.head_lr = torch.tensor([list(map(float, weight_lr)), list(map(float, bias_lr))], dtype=torch.float64)
        self.head_decay = torch.tensor([list(map(float, weight_decay)), list(map(float, bias_decay))],
                                       dtype=torch.float64)
        if self.head_lr.shape != (2, len(stacked.bias)) or self.head_decay.shape != self.head_lr.shape:
            raise ValueError(f"one lr and weight decay per head: {len(stacked.bias)} heads")
        # which of weight and bias any head decays (a head without decay gets x1 or + 0 x param: exactly none),
        # and the decay as a [K, 1, ...] factor in the parameter's dtype, for L2
        self.decays = [bool((row != 0).any()) for row in self.head_decay]
        self.l2 = [self.per_head(row, param) for row, param in zip(self.head_decay, self.param_groups[0]["params"])]

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        group = self.param_groups[0]
        params = group["params"]
        if any(param.grad is None for param in params):  # no backward since zero_grad: nothing to step
            return loss
        # each head's lr at this step, in double as the scheduler sets a group's: its own lr x the schedule's factor
        lr = self.head_lr * group["lr"]
        if self.kind == "adam":
            self._adam(params, lr, group)
        else:
            self._sgd(params, lr, group)
        return loss

    def per_head(self, values: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
        """[K] doubles as [K, 1, ...] in the parameter's dtype and device: one rounding, as a Python scalar gets."""
        return values.to(device=param.device, dtype=param.dtype).view(-1, *[1] * (param.ndim - 1))

    def per_param(self, values: torch.Tensor) -> list[torch.Tensor]:
        """[2, K] doubles (weight row, bias row) as the weight's [K, 1, 1] and the bias's [K, 1], rounded once."""
        weight = self.param_groups[0]["params"][0]
        values = values.to(device=weight.device, dtype=weight.dtype)
        return [values[0].view(-1, 1, 1), values[1].view(-1, 1)]

    def _adam(self, params: list[torch.Tensor], lr: torch.Tensor, group: dict) -> None:
        """torch.optim.adam._single_tensor_adam (capturable=False, differentiable=False), every head at once."""
        beta1, beta2 = group["betas"]
        state = self.state[params[0]]  # both tensors' state, [weight, bias] each
        if not state:
            state["step"] = 0
            for name in ("exp_avg", "exp_avg_sq", *(("max_exp_avg_sq",) if group["amsgrad"] else ())):
                state[name] = [torch.zeros_like(param, memory_format=torch.preserve_format) for param in params]
        state["step"] += 1
        step = float(state["step"])
        bias_correction1 = 1 - beta1 ** step
        bias_correction2_sqrt = (1 - beta2 ** step) ** 0.5
        # the per-head scalars torch computes in Python: -step_size and, decoupled, the decay factor
        step_size = self.per_param(-(lr / bias_correction1))
        keep = self.per_param(1 - lr * self.head_decay) if self.decoupled else None
        for i, param in enumerate(params):
            grad = param.grad if not group["maximize"] else -param.grad
            exp_avg, exp_avg_sq = state["exp_avg"][i], state["exp_avg_sq"][i]
            if self.decays[i]:
                if self.decoupled:
                    param.mul_(keep[i])
                else:
                    grad = grad.addcmul(param, self.l2[i])  # = grad.add(param, alpha=wd): the same bits
            exp_avg.lerp_(grad, 1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            if group["amsgrad"]:
                torch.maximum(state["max_exp_avg_sq"][i], exp_avg_sq, out=state["max_exp_avg_sq"][i])
                denom = (state["max_exp_avg_sq"][i].sqrt() / bias_correction2_sqrt).add_(group["eps"])
            else:
                denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(group["eps"])
            # addcdiv_(exp_avg, denom, value=-step_size) computes param + (value x exp_avg) / denom: the same order
            param.addcdiv_(exp_avg * step_size[i], denom)

    def _sgd(self, params: list[torch.Tensor], lr: torch.Tensor, group: dict) -> None:
        """torch.optim.sgd._single_tensor_sgd, every head at once."""
        neg_lr = self.per_param(-lr)
        momentum = group["momentum"]
        buffers = self.state[params[0]].setdefault("momentum_buffer", [None] * len(params))
        for i, param in enumerate(params):
            grad = param.grad if not group["maximize"] else -param.grad
            if self.decays[i]:
                grad = grad.addcmul(param, self.l2[i])  # = grad.add(param, alpha=wd): the same bits
            if momentum != 0:
                if buffers[i] is None:
                    buffers[i] = grad.detach().clone()
                else:
                    buffers[i].mul_(momentum).add_(grad, alpha=1 - group["dampening"])
                grad = grad.add(buffers[i], alpha=momentum) if group["nesterov"] else buffers[i]
            param.addcmul_(grad, neg_lr[i])  # = param.add_(grad, alpha=-lr): the same bits
