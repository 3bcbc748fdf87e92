"""The head grid (finetune.compare.head_grid): one pass trains K heads that each match the real `strategy=cached`
run of their (lr, weight decay), without reading the test split."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from finetune.compare import stacked_heads
from finetune.compare.head_grid import fit_head_grid
from finetune.data.base import TensorImageDataModule
from finetune.data.features.cache import FeatureCache
from finetune.data.features.cached import CachedFeatureDataModule
from finetune.errors import ConfigError
from finetune.optim import WarmupCosine, phased_schedule
from tests.conftest import fit

# 128 train rows in 8 batches, 32 val rows, 3 epochs: enough steps for the schedule and the lrs to tell heads apart
GRID_DATA = ["data.num_samples=128", "trainer.max_epochs=3"]


@pytest.fixture(autouse=True)
def _one_thread():
    """The heads' matmuls are too small to share: on a loaded 2-core machine a second thread's spin-waits made a
    grid 50x slower. Both the run and the grid see the same setting, so the comparisons are unaffected."""
    torch.set_num_threads(1)
    yield


class ValScores(L.Callback):
    """The real run's val/acc and val/loss of every epoch, as the module logged them."""

    def __init__(self):
        self.acc, self.loss = [], []

    def on_validation_end(self, trainer, module):
        self.acc.append(float(trainer.callback_metrics["val/acc"]))
        self.loss.append(float(trainer.callback_metrics["val/loss"]))


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_a_grid_of_one_is_the_real_cached_run(tiny, optimizer):
    overrides = [*GRID_DATA, f"optimizer={optimizer}", "optimizer.lr=0.05", "optimizer.weight_decay=0.1"]
    scores = ValScores()
    _, _, datamodule = fit(tiny(*overrides), callbacks=(scores,))
    result = fit_head_grid(tiny(*overrides), [{"lr": 0.05, "weight_decay": 0.1}])
    assert result["stacked"], "a linear head under AdamW or SGD steps stacked by default"

    assert result["cache_keys"] == {s: datamodule.report["cache_keys"][s] for s in ("train", "val")}, \
        "the grid reads the run's own cache entries"
    assert result["extract_seconds"] == 0, "the run extracted them: a cache hit"
    assert result["samples"] == 128 and result["epochs"] == 3
    head = result["heads"][0]
    assert len(set(scores.loss)) == 3, "the head trains: every epoch's val loss differs"
    # the same batches, initial head, optimizer groups and schedule: the same predictions every epoch, so the same
    # accuracy; the loss is the same mean, summed in another order (the run weighs batch means by their size)
    assert head["val_acc"] == scores.acc
    assert head["val_loss"] == pytest.approx(scores.loss, rel=1e-6, abs=0)
    assert head["best_val_acc"] == max(scores.acc) and scores.acc[head["best_epoch"]] == max(scores.acc)


@pytest.mark.parametrize("head, stacked", [([], None), ([], False),
                                           (["head=mlp", "head.hidden_sizes=[16]", "head.dropout=0"], None)],
                         ids=["linear-stacked", "linear-torch.optim", "mlp"])
def test_heads_trained_together_do_not_interact(tiny, head, stacked):
    grid = [{"lr": 0.05, "weight_decay": 0.1}, {"lr": 1e-3, "weight_decay": 0.0}, {"lr": 0.2, "weight_decay": 1.0}]
    result = fit_head_grid(tiny(*GRID_DATA, *head), grid, stacked=stacked)
    assert result["stacked"] == (not head and stacked is None), "linear heads step stacked unless told otherwise"
    together = result["heads"]
    alone = [fit_head_grid(tiny(*GRID_DATA, *head), [setting], stacked=False)["heads"][0] for setting in grid]
    assert len({tuple(h["val_loss"]) for h in together}) == 3, "the settings give different heads"
    # each head gets only its own cross-entropy's gradient and its own groups' lr and decay; each alone is stepped by
    # torch.optim, so the stacked step is checked against it too. Not bitwise for linear heads: one matmul over the K
    # heads' concatenated weights rounds apart from a head-sized one (about 1e-7)
    for grouped, single in zip(together, alone):
        assert grouped["val_acc"] == single["val_acc"]
        assert grouped["val_loss"] == pytest.approx(single["val_loss"], rel=1e-6, abs=0)
        assert (grouped["best_val_acc"], grouped["best_epoch"]) == (single["best_val_acc"], single["best_epoch"])


def test_the_grid_never_reads_the_test_split(tiny, monkeypatch, tmp_path):
    read = []
    for name in ("split_dataset", "subset_loader", "split_loader"):
        original = getattr(TensorImageDataModule, name)
        monkeypatch.setattr(TensorImageDataModule, name,
                            lambda self, split, *a, _original=original, **k: read.append(split) or _original(
                                self, split, *a, **k))

    def refuse(self):
        raise AssertionError("the head grid built the test loader")

    monkeypatch.setattr(CachedFeatureDataModule, "test_dataloader", refuse)
    fit_head_grid(tiny(*GRID_DATA), [{"lr": 0.05, "weight_decay": 0.1}])
    assert {"train", "val"} <= set(read) and "test" not in read
    splits = {entry.manifest["identity"]["split"] for entry in FeatureCache(tmp_path / "cache").entries()}
    assert splits == {"train", "val"}, "no test features were extracted"


@pytest.mark.parametrize("grid, overrides, message", [
    ([], [], "head grid is empty; give at least one {lr, weight_decay} configuration"),
    ([{"lr": 0.0, "weight_decay": 0.0}], [], "head grid entry 0: lr=0.0 must be a positive number"),
    ([{"lr": 1e-3, "weight_decay": 0}, {"lr": -1, "weight_decay": 0}], [],
     "head grid entry 1: lr=-1 must be a positive number"),
    ([{"lr": 1e-3, "weight_decay": -0.1}], [], "head grid entry 0: weight_decay=-0.1 must be 0 or more"),
    ([{"lr": 1e-3}], [], "head grid entry 0 = {'lr': 0.001} needs both lr and weight_decay"),
    ([{"lr": 1e-3, "weight_decay": 0}], ["strategy=freeze"],
     "strategy=freeze for the head grid, which trains heads on cached features only; choose strategy=cached"),
])
def test_bad_input_is_refused_in_one_line(tiny, grid, overrides, message):
    with pytest.raises(ConfigError) as refused:
        fit_head_grid(tiny(*overrides), grid)
    assert str(refused.value) == message


def test_stacked_is_refused_in_one_line_where_the_heads_cannot_stack(tiny):
    mlp = tiny("head=mlp", "head.hidden_sizes=[16]", "head.dropout=0")
    with pytest.raises(ConfigError, match=r"^head grid stacked=True, but the heads are not all linear without "
                                          r"dropout; stacked=False steps them with torch.optim$"):
        fit_head_grid(mlp, [{"lr": 1e-3, "weight_decay": 0}], stacked=True)


def test_bad_epochs_are_refused_in_one_line(tiny):
    with pytest.raises(ConfigError, match=r"^head grid epochs=0 must be a positive integer \(null: "
                                          r"trainer.max_epochs\)$"):
        fit_head_grid(tiny(), [{"lr": 1e-3, "weight_decay": 0}], epochs=0)


# -- the stacked step (compare/stacked_heads.py) against torch.optim on each head alone

OPTIMIZERS = {
    "adamw": lambda params: torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01),
    "adam_l2_amsgrad": lambda params: torch.optim.Adam(params, lr=1e-3, betas=(0.8, 0.99), eps=1e-6,
                                                       weight_decay=0.01, amsgrad=True),
    "sgd_nesterov": lambda params: torch.optim.SGD(params, lr=1e-2, momentum=0.9, nesterov=True, weight_decay=1e-4),
    "sgd_momentum_dampening": lambda params: torch.optim.SGD(params, lr=1e-2, momentum=0.9, dampening=0.1,
                                                             weight_decay=1e-4),
    "sgd_plain_maximize": lambda params: torch.optim.SGD(params, lr=1e-2, weight_decay=1e-4, maximize=True),
}


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_the_stacked_step_is_torch_optim_on_each_head_alone(name):
    """Head k's weight and bias after 30 steps of the stacked step: those of cfg.optimizer's class over that head
    alone, with its lr and decay split as optim.param_groups splits them (the bias without decay), under the same
    warmup-cosine schedule, from the same gradients."""
    factory, steps = OPTIMIZERS[name], 30
    settings = [(0.05, 0.1), (1e-3, 0.0), (0.2, 1.0), (3e-4, 1e-4)]  # (lr, weight decay) per head
    torch.manual_seed(0)
    linears = [torch.nn.Linear(37, 5) for _ in settings]
    alone = [torch.nn.Linear(37, 5) for _ in settings]
    for single, linear in zip(alone, linears):
        single.load_state_dict(linear.state_dict())
    stack = stacked_heads.StackedLinear(linears)
    template = stacked_heads.probe(factory)
    assert stacked_heads.stackable(template) is None
    lrs, decays = [lr for lr, _ in settings], [wd for _, wd in settings]
    stacked = stacked_heads.StackedHeadOptimizer(stack, template, lrs, decays, lrs, [0.0] * len(settings))
    schedules = [phased_schedule(stacked, steps, WarmupCosine())]
    singles = []
    for single, (lr, wd) in zip(alone, settings):
        optimizer = factory([{"params": [single.weight], "lr": lr, "weight_decay": wd},
                             {"params": [single.bias], "lr": lr, "weight_decay": 0.0}])
        singles.append(optimizer)
        schedules.append(phased_schedule(optimizer, steps, WarmupCosine()))
    for _ in range(steps):
        weight_grad, bias_grad = torch.randn_like(stack.weight), torch.randn_like(stack.bias)
        stack.weight.grad, stack.bias.grad = weight_grad.clone(), bias_grad.clone()
        for k, (single, optimizer) in enumerate(zip(alone, singles)):
            single.weight.grad, single.bias.grad = weight_grad[k].clone(), bias_grad[k].clone()
            optimizer.step()
        stacked.step()
        for schedule in schedules:
            schedule.step()
    for k, single in enumerate(alone):
        assert not torch.equal(single.weight, linears[k].weight), "the head moved"
        torch.testing.assert_close(stack.weight[k], single.weight, rtol=1e-6, atol=0)
        torch.testing.assert_close(stack.bias[k], single.bias, rtol=1e-6, atol=0)  # on this CPU: the same bits
    assert not torch.allclose(stack.weight[0], stack.weight[2], rtol=1e-3), "the settings give different heads"
