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
        double = {"dtype": torch.float64}
        self.head_lr = [torch.as_tensor(weight_lr, **double), torch.as_tensor(bias_lr, **double)]
        self.head_decay = [torch.as_tensor(weight_decay, **double), torch.as_tensor(bias_decay, **double)]
        count = len(stacked.bias)
        if any(len(values) != count for values in (*self.head_lr, *self.head_decay)):
            raise ValueError(f"one lr and weight decay per head: {count} heads")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        group = self.param_groups[0]
        for param, lr, decay in zip(group["params"], self.head_lr, self.head_decay):
            if param.grad is None:
                continue
            # head k's lr at this step, in double as the scheduler sets a group's: its own lr x the factor
            lr = lr * group["lr"]
            if self.kind == "adam":
                self._adam(param, lr, decay, group)
            else:
                self._sgd(param, lr, decay, group)
        return loss

    def per_head(self, values: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
        """[K] doubles as [K, 1, ...] in the parameter's dtype and device: one rounding, as a Python scalar gets."""
        return values.to(device=param.device, dtype=param.dtype).view(-1, *[1] * (param.ndim - 1))

    def _adam(self, param: torch.Tensor, lr: torch.Tensor, decay: torch.Tensor, group: dict) -> None:
        """torch.optim.adam._single_tensor_adam (capturable=False, differentiable=False), every head at once."""
        grad = param.grad if not group["maximize"] else -param.grad
        state = self.state[param]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            if group["amsgrad"]:
                state["max_exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        state["step"] += 1
        step = float(state["step"])
        beta1, beta2 = group["betas"]
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        if bool((decay != 0).any()):  # a head without decay: x1 (decoupled) or + 0 x param (L2), exactly its own
            if self.decoupled:
                param.mul_(self.per_head(1 - lr * decay, param))
            else:
                grad = grad.addcmul(param, self.per_head(decay, param))  # = grad.add(param, alpha=wd), same bits
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        bias_correction1 = 1 - beta1 ** step
        bias_correction2_sqrt = (1 - beta2 ** step) ** 0.5
        if group["amsgrad"]:
            torch.maximum(state["max_exp_avg_sq"], exp_avg_sq, out=state["max_exp_avg_sq"])
            denom = (state["max_exp_avg_sq"].sqrt() / bias_correction2_sqrt).add_(group["eps"])
        else:
            denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(group["eps"])
        # addcdiv_(exp_avg, denom, value=-step_size) computes param + (value x exp_avg) / denom: the same order
        param.addcdiv_(exp_avg * self.per_head(-(lr / bias_correction1), param), denom)

    def _sgd(self, param: torch.Tensor, lr: torch.Tensor, decay: torch.Tensor, group: dict) -> None:
        """torch.optim.sgd._single_tensor_sgd, every head at once."""
        grad = param.grad if not group["maximize"] else -param.grad
        if bool((decay != 0).any()):
            grad = grad.addcmul(param, self.per_head(decay, param))  # = grad.add(param, alpha=wd), same bits
        momentum = group["momentum"]
        if momentum != 0:
            state = self.state[param]
            buffer = state.get("momentum_buffer")
            if buffer is None:
                buffer = state["momentum_buffer"] = grad.detach().clone()
            else:
                buffer.mul_(momentum).add_(grad, alpha=1 - group["dampening"])
            grad = grad.add(buffer, alpha=momentum) if group["nesterov"] else buffer
        param.addcmul_(grad, self.per_head(-lr, param))  # = param.add_(grad, alpha=-lr), same bits
