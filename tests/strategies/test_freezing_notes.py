"""The seven behaviours of ../shared/reference/freezing-notes.txt, each checked on the real strategy code.

Each test names the notebook cell it reproduces. The "earlier layer" of the notebook is a trainable 1x1 conv put in
front of the backbone, the way an input adapter would be.
"""

from __future__ import annotations

import torch
from torch import nn

from finetune.build import build


def adapter_and_module(tiny, strategy: str, *extra: str):
    _, module = build(tiny(f"strategy={strategy}", *extra))
    module.train()
    adapter = nn.Conv2d(3, 3, kernel_size=1)  # a trainable layer before the backbone
    images = torch.randn(4, 3, 32, 32)
    return adapter, module, images


def test_in8_no_grad_leaves_inputs_and_parameters_alone_but_outputs_carry_no_grad(tiny):
    adapter, module, images = adapter_and_module(tiny, "no_grad")
    inputs = adapter(images)
    features = module.strategy.extract(module.backbone, inputs)
    assert inputs.requires_grad, "the input keeps its own requires_grad"
    assert all(p.requires_grad for p in module.backbone.parameters()), "no_grad does not touch parameters"
    assert not features.requires_grad and features.grad_fn is None


def test_in9_no_grad_cuts_backpropagation_to_layers_before_it(tiny):
    adapter, module, images = adapter_and_module(tiny, "no_grad")
    module.head(module.strategy.extract(module.backbone, adapter(images))).sum().backward()
    assert adapter.weight.grad is None, "nothing flows back through a no_grad backbone"
    assert all(p.grad is None for p in module.backbone.parameters())
    assert module.head[-1].weight.grad is not None


def test_in10_freeze_sets_requires_grad_false_on_exactly_the_frozen_parameters(tiny):
    _, module = build(tiny("strategy=freeze"))
    assert not any(p.requires_grad for p in module.backbone.parameters())
    assert all(p.requires_grad for p in module.head.parameters())
    trainable = {n for n, _ in module.strategy.trainable_parameters(module)}
    assert trainable == {n for n, _ in module.head.named_parameters(prefix="head")}


def test_in11_gradients_flow_through_frozen_layers_into_earlier_trainable_ones(tiny):
    adapter, module, images = adapter_and_module(tiny, "freeze")
    module.head(module.strategy.extract(module.backbone, adapter(images))).sum().backward()
    assert adapter.weight.grad is not None and adapter.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in module.backbone.parameters()), "frozen parameters get no gradient"
    assert module.head[-1].weight.grad is not None


def test_in12_a_frozen_layer_fed_by_a_trainable_one_records_a_graph(tiny):
    adapter, module, images = adapter_and_module(tiny, "freeze", "strategy.modules=[blocks.2]")
    stem = module.backbone.bn1(module.backbone.conv_stem(images))
    early = module.backbone.blocks[1](module.backbone.blocks[0](stem))
    middle = module.backbone.blocks[2](early)  # frozen block
    assert stem.grad_fn is not None and early.grad_fn is not None
    assert middle.requires_grad and middle.grad_fn is not None, "a frozen block's output keeps the graph"


def test_in26_a_frozen_layer_on_inputs_without_grad_builds_no_graph(tiny):
    _, frozen = build(tiny("strategy=freeze"))
    _, full = build(tiny("strategy=full"))
    images = torch.randn(2, 3, 32, 32)
    assert not images.requires_grad
    assert not frozen.strategy.extract(frozen.backbone, images).requires_grad, "all-frozen backbone: no graph kept"
    assert full.strategy.extract(full.backbone, images).requires_grad


def test_in18_19_cached_features_are_detached_and_training_on_them_leaves_the_backbone_alone(tiny, tmp_path):
    cfg = tiny("strategy=cached")
    datamodule, module = build(cfg)
    datamodule.setup("fit")
    features = datamodule.features("train")
    assert not features.requires_grad and features.grad_fn is None
    batch_features, labels = next(iter(datamodule.train_dataloader()))
    module.train()
    module.criterion(module(batch_features), labels).backward()
    assert all(p.grad is None for p in module.backbone.parameters()), "the stored graph-free copy cuts backprop"
    assert module.head[-1].weight.grad is not None
    # the cache holds the same values a live backbone gives (its graph is simply not kept)
    images, _ = next(iter(datamodule.images.subset_loader("train", torch.arange(8), 8)))
    with torch.no_grad():
        live = module.backbone.eval()(datamodule.images.preprocess(images))
    ordered = datamodule.features("train")[:8]
    torch.testing.assert_close(ordered, live, rtol=1e-5, atol=1e-5)
