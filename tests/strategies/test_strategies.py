"""Which parameters update and which do not, per strategy, after real optimizer steps in a real Trainer fit."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
from hydra.utils import instantiate
from torch.nn.modules.batchnorm import _BatchNorm

from finetune.errors import ConfigError
from finetune.build import build, instantiate_all
from tests.conftest import fit, initial_state, snapshot

STRATEGIES = ["full", "freeze", "no_grad", "cached"]


def optimizer_names(trainer, module) -> set[str]:
    ids = {id(p) for opt in trainer.optimizers for g in opt.param_groups for p in g["params"]}
    return {n for n, p in module.named_parameters() if id(p) in ids}


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_exactly_the_intended_parameters_change(tiny, tmp_path, strategy):
    cfg = tiny(f"strategy={strategy}")
    before = initial_state(cfg)
    trainer, module, _ = fit(cfg)
    after = snapshot(module)
    backbone_params = {n for n, _ in module.named_parameters() if n.startswith("backbone.")}
    head_params = {n for n, _ in module.named_parameters() if n.startswith("head.")}
    changed = {n for n in before if not torch.equal(before[n], after[n])}

    assert head_params <= changed, "the head must train under every strategy"
    if strategy == "full":
        assert backbone_params <= changed
        assert optimizer_names(trainer, module) == backbone_params | head_params
        assert any(n.endswith("running_mean") for n in changed), "full fine-tuning updates BN statistics"
    else:
        frozen_backbone = {n for n in before if n.startswith("backbone.")}
        assert not (changed & frozen_backbone), f"{strategy} changed frozen tensors: {sorted(changed & frozen_backbone)[:5]}"
        for name in frozen_backbone:  # bitwise, including BN running stats and num_batches_tracked
            assert torch.equal(before[name], after[name]), name
        assert optimizer_names(trainer, module) == head_params
        assert all(not m.training for m in module.backbone.modules()), "frozen backbone must end fit in eval mode"
        for name, param in module.named_parameters():
            if name in backbone_params:
                assert param.grad is None, f"{name} has a gradient under {strategy}"

    audit = json.loads((tmp_path / "param_audit.json").read_text())
    assert audit["violations"] == []
    assert {n for n, e in audit["parameters"].items() if e["in_optimizer"]} == optimizer_names(trainer, module)
    assert {n for n, e in audit["parameters"].items() if e["changed"]} == {n for n in changed if n in head_params | backbone_params}


@pytest.mark.parametrize("strategy", ["freeze", "no_grad"])
def test_frozen_parameters_get_no_gradient_in_a_training_step(tiny, strategy):
    datamodule, module = build(tiny(f"strategy={strategy}"))
    images, labels = next(iter(datamodule.train_dataloader()))
    module.train()
    loss = module.criterion(module(datamodule.preprocess(images)), labels)
    loss.backward()
    for name, param in module.named_parameters():
        if name.startswith("backbone."):
            assert param.grad is None, name
        else:
            assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_frozen_batchnorm_stays_in_eval_mode_through_lightning_mode_switches(tiny):
    cfg = tiny("strategy=freeze", "trainer.max_epochs=3")
    seen_training = []

    class WatchModes(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            seen_training.append(any(m.training for m in module.backbone.modules() if isinstance(m, _BatchNorm)))

        def on_validation_end(self, trainer, module):
            module.train()  # what Lightning does after every validation loop

    L.seed_everything(0)
    datamodule, module = build(cfg)
    trainer = instantiate(cfg.trainer, callbacks=[*instantiate_all(cfg.callbacks), WatchModes()],
                          logger=instantiate_all(cfg.logger))
    trainer.fit(module, datamodule=datamodule)
    assert len(seen_training) == 3 * 4 and not any(seen_training)


def test_train_bn_keeps_frozen_batchnorm_training(tiny):
    trainer, module, _ = fit(tiny("strategy=freeze", "strategy.train_bn=true"))
    bn_params = {f"backbone.{n}.{p}" for n, m in module.backbone.named_modules() if isinstance(m, _BatchNorm)
                 for p in ("weight", "bias")}
    assert bn_params <= optimizer_names(trainer, module)
    conv_weight = module.backbone.conv_stem.weight
    assert not conv_weight.requires_grad and conv_weight.grad is None
    assert all(m.training for m in module.backbone.modules() if isinstance(m, _BatchNorm))


def test_partial_freeze_of_a_middle_block_still_trains_the_earlier_block(tiny, tmp_path):
    cfg = tiny("strategy=freeze", "strategy.modules=[blocks.1]")
    before = initial_state(cfg)
    trainer, module, _ = fit(cfg)
    after = snapshot(module)
    for name in before:
        if name.startswith("backbone.blocks.1."):
            assert torch.equal(before[name], after[name]), f"frozen {name} changed"
        elif name.startswith(("backbone.blocks.0.", "backbone.conv_stem.")) and "num_batches" not in name:
            assert not torch.equal(before[name], after[name]), f"{name}, below the frozen block, did not train"
    assert all(not m.training for m in module.backbone.blocks[1].modules())


def test_strategies_that_train_only_the_head_agree_and_full_differs(tiny):
    """Eval-mode BN, no augmentation, same batches: freeze, no_grad and cached must step the head identically."""
    heads = {}
    for strategy in STRATEGIES:
        _, module, _ = fit(tiny(f"strategy={strategy}", "optimizer.lr=1e-2", "~callbacks.model_checkpoint"))
        heads[strategy] = {n: p.detach().clone() for n, p in module.head.named_parameters()}
    for strategy in ("no_grad", "cached"):
        for name, value in heads["freeze"].items():
            torch.testing.assert_close(heads[strategy][name], value, rtol=1e-4, atol=1e-5)
    assert not all(torch.allclose(heads["full"][n], v, atol=1e-5) for n, v in heads["freeze"].items())


def test_unknown_module_name_in_partial_freeze_is_one_clear_error(tiny):
    with pytest.raises(ConfigError, match=r"strategy.modules entry 'blocks.9' names no submodule.*conv_stem"):
        build(tiny("strategy=freeze", "strategy.modules=[blocks.9]"))


def test_compile_keeps_state_dict_keys_plain(tiny):
    _, module = build(tiny("strategy=full", "compile=true"))
    keys = set(module.state_dict())
    module.setup("fit")
    assert set(module.state_dict()) == keys and not any("_orig_mod" in k for k in keys)


def test_train_bn_keeps_only_batchnorm_training_so_frozen_dropout_and_drop_path_stay_off(tiny):
    cfg = tiny("strategy=freeze", "strategy.train_bn=true", "+backbone.drop_rate=0.5", "+backbone.drop_path_rate=0.5")
    _, module = build(cfg)
    module.train()  # what Lightning does every epoch
    for name, sub in module.backbone.named_modules():
        assert sub.training == isinstance(sub, _BatchNorm), f"{name or 'backbone'} ({type(sub).__name__})"
    images = torch.randn(8, 3, 32, 32)
    with torch.no_grad():  # batch statistics are deterministic; dropout and drop-path would not be
        torch.testing.assert_close(module.backbone(images), module.backbone(images))
    # and the audit checks those same modules
    assert {id(m) for m in module.strategy.eval_modules(module)} == {
        id(m) for m in module.backbone.modules() if not isinstance(m, _BatchNorm)}


def test_channels_last_is_applied_in_setup_when_the_run_is_on_a_gpu(tiny):
    """setup() runs before the strategy wraps the model in DDP (tests/run/test_ddp.py pins that order)."""
    from types import SimpleNamespace

    _, module = build(tiny("strategy=full"))
    module._trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cuda")))
    module.setup("fit")
    assert module.backbone.conv_stem.weight.is_contiguous(memory_format=torch.channels_last)
    _, on_cpu = build(tiny("strategy=full"))
    on_cpu.setup("fit")
    assert not on_cpu.backbone.conv_stem.weight.is_contiguous(memory_format=torch.channels_last)
