"""A DINOv2-style head grid: K heads, one per (lr, weight decay), trained together in one pass over the cached
features of `strategy=cached`, each scored on the val split every epoch. The comparison's tuning reads the scores to
pick a head's lr and weight decay before any run touches the test split.

Each head is the run's own: the same cache entries and datamodule (build.py, so the same batches in the same seeded
order), the head as `cfg.head` builds it from the same seeded initial weights, cfg.optimizer's class with the
project's parameter groups (biases without decay), cfg.scheduler over the same steps, the run's device and precision.
So head k follows what `finetune-train strategy=cached optimizer.lr=lr_k optimizer.weight_decay=wd_k` trains, and
costs one pass over the features for all K. The test split is never extracted, loaded or iterated.

Linear heads under AdamW, Adam or SGD (the project's optimizers) train stacked (stacked_heads.py): one weight
[K, classes, features] and one bias [K, classes], stepped all at once by a mirror of torch's own update with each
head's lr and decay, instead of torch.optim's loop over 2K param groups, which was most of a wide grid's time. Any
other head or optimizer, or `stacked=False`, keeps cfg.optimizer's class with a group per head and decay setting.
"""

from __future__ import annotations

import copy
import inspect
import logging
import time
from collections.abc import Sequence

import lightning as L
import torch
from omegaconf import DictConfig
from torch import nn
from torch.nn import functional as F

from finetune.build import build
from finetune.compare import stacked_heads
from finetune.config import instantiate
from finetune.data.features import identity as entry_identity
from finetune.errors import ConfigError
from finetune.heads import LinearHead
from finetune.optim import param_groups, phased_schedule

log = logging.getLogger(__name__)
GRID_SPLITS = ("train", "val")  # never "test": the grid tunes on val


def check_grid(cfg: DictConfig, grid: Sequence[dict], epochs: int | None) -> int:
    """One line for what cannot run: an empty grid, a non-positive lr, a negative weight decay, a strategy other
    than cached, a non-positive epoch count. Returns the epochs to train."""
    if not grid:
        raise ConfigError("head grid is empty; give at least one {lr, weight_decay} configuration")
    for index, setting in enumerate(grid):
        if not {"lr", "weight_decay"} <= set(setting):
            raise ConfigError(f"head grid entry {index} = {dict(setting)} needs both lr and weight_decay")
        if not float(setting["lr"]) > 0:
            raise ConfigError(f"head grid entry {index}: lr={setting['lr']} must be a positive number")
        if not float(setting["weight_decay"]) >= 0:
            raise ConfigError(f"head grid entry {index}: weight_decay={setting['weight_decay']} must be 0 or more")
    name = instantiate(cfg.strategy).name
    if name != "cached":
        raise ConfigError(f"strategy={name} for the head grid, which trains heads on cached features only; "
                          f"choose strategy=cached")
    epochs = cfg.trainer.max_epochs if epochs is None else epochs
    if epochs is None or int(epochs) <= 0:
        raise ConfigError(f"head grid epochs={epochs} must be a positive integer (null: trainer.max_epochs)")
    return int(epochs)


def grid_trainer(cfg: DictConfig) -> L.Trainer:
    """The run's Trainer on one device, never fitted: it decides the device and precision, as the real run's does,
    and the datamodule reads them from it (they are part of the cache key). Nothing of it logs or checkpoints."""
    return instantiate(cfg.trainer, devices=1, num_nodes=1, strategy="auto", callbacks=[], logger=False,
                       enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)


def grid_optimizer(module, heads: nn.ModuleList, grid: Sequence[dict], fused: bool) -> torch.optim.Optimizer:
    """cfg.optimizer's class over every head: each head's groups carry its lr and weight decay, split as the real run
    splits them (optim.param_groups: biases and other 1-D parameters without decay, lr_mult for `head` applied).
    fused: torch's fused kernel where the class has one, one call per group instead of one per operation and tensor
    (the per-group loop is most of a wide grid's step); the update is the same up to rounding."""
    groups = []
    for index, (head, setting) in enumerate(zip(heads, grid)):
        named = [(f"head.{name}", param) for name, param in head.named_parameters()]
        head_groups, _ = param_groups(module, named, float(setting["lr"]), float(setting["weight_decay"]),
                                      module.layer_decay, module.lr_mult)
        for group in head_groups:
            group["name"] = f"grid{index}/{group['name']}"
        groups += head_groups
    factory = module.optimizer_factory
    if fused and "fused" in inspect.signature(getattr(factory, "func", factory)).parameters:
        return factory(groups, fused=True)
    return factory(groups)


def linear_layers(heads: nn.ModuleList) -> list[nn.Linear] | None:
    """The heads' Linear layers when every head is a LinearHead without dropout, so that one matmul over their
    concatenated weights computes every head's logits; None otherwise (each head then runs as its own module)."""
    if all(isinstance(head, LinearHead) and isinstance(head[0], nn.Identity) for head in heads):
        return [head[-1] for head in heads]
    return None


class HeadList(nn.Module):
    """The heads as their own modules, for torch.optim with a group per head; forward gives [batch, heads, classes].
    Linear heads: one matmul over the concatenated weights (a head-sized matmul each costs more in calls than in
    arithmetic), whose gradient still reaches each head's own parameters; any other head (MLP, dropout) as its own
    module, so it draws its own dropout masks."""

    def __init__(self, heads: nn.ModuleList):
        super().__init__()
        self.heads, self.linears = heads, linear_layers(heads)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.linears is None:
            return torch.stack([head(features) for head in self.heads], dim=1)
        weight = torch.cat([linear.weight for linear in self.linears])
        bias = torch.cat([linear.bias for linear in self.linears])
        return F.linear(features, weight, bias).view(len(features), len(self.linears), -1)


def grid_heads(module, heads: nn.ModuleList, grid: Sequence[dict], fused: bool,
               stacked: bool | None) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The grid's heads as trained, forward [batch, heads, classes], and their optimizer. Stacked (StackedLinear and
    StackedHeadOptimizer) where every head is linear and cfg.optimizer is one the stacked step mirrors, with each
    head's weight and bias lr and decay from optim.param_groups as the run's groups get them; stacked=None: so where
    it can be, True: so or one line why not, False: HeadList and grid_optimizer (torch.optim, `fused` applies)."""
    linears = linear_layers(heads)
    if stacked is False:
        return HeadList(heads), grid_optimizer(module, heads, grid, fused)
    template = stacked_heads.probe(module.optimizer_factory)
    reason = "the heads are not all linear without dropout" if linears is None else stacked_heads.stackable(template)
    if reason is not None:
        if stacked:
            raise ConfigError(f"head grid stacked=True, but {reason}; stacked=False steps them with torch.optim")
        return HeadList(heads), grid_optimizer(module, heads, grid, fused)
    settings = {}  # per parameter: (lr, weight decay) of its group in the run
    for head, setting in zip(heads, grid):
        named = [(f"head.{name}", param) for name, param in head.named_parameters()]
        head_groups, _ = param_groups(module, named, float(setting["lr"]), float(setting["weight_decay"]),
                                      module.layer_decay, module.lr_mult)
        settings |= {param: (group["lr"], group["weight_decay"]) for group in head_groups for param in group["params"]}
    weight_lr, weight_decay = zip(*(settings[linear.weight] for linear in linears))
    bias_lr, bias_decay = zip(*(settings[linear.bias] for linear in linears))
    stack = stacked_heads.StackedLinear(linears)
    return stack, stacked_heads.StackedHeadOptimizer(stack, template, weight_lr, weight_decay, bias_lr, bias_decay)


def head_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each head's summed cross-entropy over the batch, [heads], from logits [batch, heads, classes]."""
    batch, count = logits.shape[:2]
    losses = F.cross_entropy(logits.flatten(0, 1).float(), labels.repeat_interleave(count), reduction="none")
    return losses.view(batch, count).sum(0)


def fit_head_grid(cfg: DictConfig, grid: list[dict[str, float]], *, epochs: int | None = None,
                  fused: bool = True, stacked: bool | None = None) -> dict:
    """Train one head per {"lr", "weight_decay"} of `grid` together on the cached features of `cfg` (a composed
    finetune-train config with strategy=cached) for `epochs` (None: cfg.trainer.max_epochs). stacked: step linear
    heads as one stacked tensor (None: where the heads and optimizer allow it, True: or refuse, False: torch.optim
    with a group per head). fused, on the torch.optim path only: torch's fused kernel; fused=False keeps the
    optimizer's default kernel, as the real run uses it (bitwise the run, where fused differs by rounding).

    Returns {"heads": [{"lr", "weight_decay", "val_acc": [per epoch], "val_loss": [per epoch], "best_val_acc",
    "best_epoch"} in grid order], "seconds": the grid fit's wall time, "extract_seconds": feature extraction's (0
    on a cache hit), "samples": train rows, "epochs": epochs, "cache_keys": {split: key} of the entries read,
    "stacked": whether the heads were stepped stacked}."""
    epochs = check_grid(cfg, grid, epochs)
    trainer = grid_trainer(cfg)
    L.seed_everything(cfg.seed, workers=True)  # as train() does before build: every head starts from the run's head
    if torch.cuda.is_available():
        torch.set_float32_matmul_precision(cfg.get("float32_matmul_precision", "high"))
    datamodule, module = build(cfg)
    datamodule.trainer = trainer
    datamodule.setup("fit", splits=GRID_SPLITS)
    device = trainer.strategy.root_device
    # every head a copy of the run's freshly built head: head k alone is the run with (lr_k, wd_k)
    heads = nn.ModuleList(copy.deepcopy(module.head) for _ in grid).to(device)
    train_loader, val_loader = datamodule.train_dataloader(), datamodule.val_dataloader()
    heads, optimizer = grid_heads(module, heads, grid, fused, stacked)
    # the run's schedule: module.configure_optimizers' for a single phase, over trainer.estimated_stepping_batches
    scheduler = phased_schedule(optimizer, epochs * len(train_loader), module.schedule_shape)
    autocast = entry_identity.extraction_mode(device, str(trainer.precision))["autocast"]
    precision = torch.autocast(device.type, dtype=getattr(torch, autocast or "float32"), enabled=autocast is not None)
    scaler = torch.amp.GradScaler(device.type, enabled=autocast == "float16")  # as Lightning's 16-mixed

    val_acc, val_loss = [], []
    start = time.perf_counter()
    for epoch in range(epochs):
        train_loader.sampler.set_epoch(epoch)  # Lightning does this before each epoch: the same seeded order
        heads.train()
        for batch in train_loader:
            features, labels = datamodule.on_after_batch_transfer(to_device(batch, device), 0)
            with precision:
                # the sum of the heads' mean cross-entropies: each head's parameters get its own loss's gradient only
                loss = head_losses(heads(features), labels).sum() / len(labels)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
        accuracy, mean_loss = evaluate(heads, len(grid), val_loader, datamodule, device, precision)
        val_acc.append(accuracy)
        val_loss.append(mean_loss)
        best = max(range(len(grid)), key=lambda k: accuracy[k])
        log.info("head grid epoch %d/%d: best val acc %.4f (lr=%g, weight_decay=%g) of %d heads", epoch + 1, epochs,
                 accuracy[best], grid[best]["lr"], grid[best]["weight_decay"], len(grid))
    seconds = time.perf_counter() - start
    return {"heads": [head_scores(setting, [a[k] for a in val_acc], [v[k] for v in val_loss])
                      for k, setting in enumerate(grid)],
            "seconds": seconds, "extract_seconds": datamodule.report["extract_seconds"],
            "samples": train_loader.sampler.length, "epochs": epochs,
            "cache_keys": dict(datamodule.report["cache_keys"]),
            "stacked": isinstance(heads, stacked_heads.StackedLinear)}


def to_device(batch, device: torch.device):
    return tuple(t.to(device, non_blocking=True) for t in batch)


@torch.inference_mode()
def evaluate(heads: nn.Module, count: int, loader, datamodule, device: torch.device,
             precision) -> tuple[list, list]:
    """Every head's (`count` of them) accuracy and mean cross-entropy over the val split, read back once."""
    heads.eval()
    correct = torch.zeros(count, device=device, dtype=torch.float64)
    total_loss = torch.zeros(count, device=device, dtype=torch.float64)
    samples = 0
    for batch in loader:
        features, labels = datamodule.on_after_batch_transfer(to_device(batch, device), 0)
        with precision:
            logits = heads(features)
        correct += (logits.argmax(-1) == labels[:, None]).sum(0)
        total_loss += head_losses(logits, labels)
        samples += len(labels)
    return (correct / samples).tolist(), (total_loss / samples).tolist()


def head_scores(setting: dict, val_acc: list[float], val_loss: list[float]) -> dict:
    best_epoch = max(range(len(val_acc)), key=lambda e: (val_acc[e], -e))  # the first epoch of the best accuracy
    return {"lr": float(setting["lr"]), "weight_decay": float(setting["weight_decay"]), "val_acc": val_acc,
            "val_loss": val_loss, "best_val_acc": val_acc[best_epoch], "best_epoch": best_epoch}

