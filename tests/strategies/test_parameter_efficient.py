"""bitfit, norm and lora: exactly the intended parameters train, every base weight and buffer stays bitwise the
pretrained one, LoRA merges into plain timm weights and its adapter alone round-trips, on a tiny ViT and a tiny conv
net. DDP: tests/run/test_ddp.py's sweeps; Lite0 on digits through the CLI: tests/test_readme.py's compare."""

from __future__ import annotations

import json

import lightning as L
import pytest
import timm
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from finetune.errors import ConfigError
from finetune.build import build
from tests.conftest import TINY, compose_config, fit, initial_state, snapshot
from tests.test_cli import start_cli
from tests.strategies.test_strategies import optimizer_names

pytest.importorskip("peft")

BACKBONES = ["test_vit", "test_efficientnet"]  # LayerNorm + Linear; BatchNorm + 1x1 and depthwise convolutions


def intended(strategy: str, module) -> set[str]:
    """What the strategy should train in the backbone, worked out here from the layers themselves."""
    backbone = {n: p for n, p in module.named_parameters() if n.startswith("backbone.")}
    if strategy == "bitfit":
        return {n for n in backbone if n.endswith(".bias")}
    if strategy == "norm":
        return {f"backbone.{layer}.{p}" for layer, m in module.backbone.named_modules()
                if isinstance(m, (_BatchNorm, nn.LayerNorm)) for p, _ in m.named_parameters(recurse=False)}
    return {n for n in backbone if ".lora_A." in n or ".lora_B." in n}


def tiny_config(tmp_path, strategy: str, backbone: str, *overrides):
    return compose_config(tmp_path, [*TINY, f"backbone.name={backbone}", f"strategy={strategy}", *overrides])


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("strategy", ["bitfit", "norm", "lora"])
def test_exactly_the_intended_parameters_change_and_base_weights_stay_bitwise(tmp_path, strategy, backbone):
    cfg = tiny_config(tmp_path, strategy, backbone)
    before = initial_state(cfg)
    trainer, module, _ = fit(cfg)
    after = snapshot(module)
    train_here = intended(strategy, module)
    head = {n for n, _ in module.named_parameters() if n.startswith("head.")}
    changed = {n for n in before if not torch.equal(before[n], after[n])}

    assert train_here and changed == train_here | head, sorted(changed ^ (train_here | head))[:6]
    assert optimizer_names(trainer, module) == train_here | head
    for name, tensor in after.items():  # every other weight and buffer, BN running stats included, bitwise
        if name.startswith("backbone.") and name not in train_here:
            assert torch.equal(before[name], tensor), name
    assert not any(m.training for m in module.backbone.modules() if isinstance(m, _BatchNorm))
    audit = json.loads((tmp_path / "param_audit.json").read_text())
    assert audit["violations"] == [] and audit["strategy"] == strategy
    assert {n for n, e in audit["parameters"].items() if e["in_optimizer"]} == train_here | head
    if strategy == "lora":  # the base weights are the layers' own tensors, and the model as built is the pretrained
        base = timm.create_model(backbone, pretrained=False, num_classes=0)
        assert {k.replace(".base_layer", "") for k in after if k.startswith("backbone.") and k not in train_here} \
            == {f"backbone.{k}" for k in base.state_dict()}


def test_norm_lets_batchnorm_statistics_follow_the_data_only_when_asked(tmp_path):
    cfg = tiny_config(tmp_path, "norm", "test_efficientnet", "strategy.freeze_bn_stats=false")
    before = initial_state(cfg)
    trainer, module, _ = fit(cfg)
    after = snapshot(module)
    stats = {n for n in before if n.endswith(("running_mean", "running_var"))}
    assert stats and all(not torch.equal(before[n], after[n]) for n in stats)
    assert all(m.training for m in module.backbone.modules() if isinstance(m, _BatchNorm))
    assert json.loads((tmp_path / "param_audit.json").read_text())["violations"] == []
    weights = {n for n in before if n.startswith("backbone.") and n.endswith(".weight") and "bn" not in n}
    assert weights and all(torch.equal(before[n], after[n]) for n in weights)


@pytest.fixture(scope="module", params=BACKBONES)
def trained_lora(request, tmp_path_factory):
    """A lora run on each tiny backbone (lr high enough that every adapter moves far from zero), and a batch."""
    run_dir = tmp_path_factory.mktemp(f"lora_{request.param}")
    cfg = tiny_config(run_dir, "lora", request.param, "optimizer.lr=3e-2")
    _, _, datamodule = fit(cfg)
    images = datamodule.preprocess(next(iter(datamodule.val_dataloader()))[0])
    return cfg, run_dir / "checkpoints" / "last.ckpt", images


def trained_module(cfg, checkpoint):
    _, module = build(cfg)
    module.load_state_dict(torch.load(checkpoint, weights_only=False)["state_dict"])
    return module.eval()


def test_lora_merges_into_plain_timm_weights_with_the_same_logits(trained_lora):
    cfg, checkpoint, images = trained_lora
    module = trained_module(cfg, checkpoint)
    with torch.no_grad():
        unmerged = module(images)
        backbone = module.strategy.merge(module)
        merged = module(images)
    assert (merged - unmerged).abs().max() <= 1e-5
    assert not any("lora" in n or "base_layer" in n for n in backbone.state_dict())
    plain = timm.create_model(cfg.backbone.name, pretrained=False, num_classes=0)
    plain.load_state_dict(backbone.state_dict(), strict=True)  # loads into timm without this package or peft
    with torch.no_grad():
        assert (module.head(plain.eval()(images)) - unmerged).abs().max() <= 1e-5


def test_the_lora_adapter_alone_round_trips_onto_the_pretrained_backbone(trained_lora, tmp_path):
    import peft

    cfg, checkpoint, images = trained_lora
    trained = trained_module(cfg, checkpoint)
    folder = trained.strategy.save_adapter(trained, tmp_path / "adapter")
    assert {"adapter_config.json", "adapter_model.safetensors", "head.safetensors"} <= {p.name for p in folder.iterdir()}
    # the pretrained backbone as the run built it, with fresh adapters (B = 0) and a fresh head
    L.seed_everything(cfg.seed)
    _, fresh = build(cfg)
    fresh.eval()
    with torch.no_grad():
        want = trained(images)
        assert not torch.allclose(fresh(images), want)
        fresh.strategy.load_adapter(fresh, folder)
        assert torch.equal(fresh(images), want)

    # peft alone: the adapter onto a plain timm backbone holding the pretrained weights
    base = timm.create_model(cfg.backbone.name, pretrained=False, num_classes=0)
    base.load_state_dict({k.removeprefix("backbone.").replace(".base_layer", ""): v
                          for k, v in trained.state_dict().items() if k.startswith("backbone.") and "lora_" not in k})
    adapted = peft.PeftModel.from_pretrained(base, str(folder)).eval()
    with torch.no_grad():
        torch.testing.assert_close(trained.head(adapted(images)), want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("backbone", [["backbone=timm", "backbone.name=vit_tiny_patch16_224", "backbone.pretrained=false",
                                       "data.image_size=224"],
                                      ["backbone=efficientnet_lite0"]], ids=["vit_tiny", "lite0"])
def test_the_adapter_is_under_a_tenth_of_the_checkpoint(tmp_path, backbone):
    tiny_data = [o for o in TINY if not o.startswith("backbone")]
    _, module = build(compose_config(tmp_path, [*tiny_data, *backbone, "strategy=lora"]))
    torch.save(module.state_dict(), tmp_path / "weights.pt")  # a checkpoint holds these and the optimizer state
    folder = module.strategy.save_adapter(module, tmp_path / "adapter")
    adapter_bytes = sum(p.stat().st_size for p in folder.iterdir())
    assert adapter_bytes < 0.1 * (tmp_path / "weights.pt").stat().st_size, adapter_bytes


@pytest.mark.parametrize("targets,message", [
    ("[conv_dw]", r"lora cannot adapt backbone layer blocks\.3\.0\.conv_dw: a depthwise convolution \(groups=\d+\), "
                  r"which peft cannot merge"),
    ("[bn1]", r"lora cannot adapt backbone layer bn1 \(BatchNormAct2d\): it adapts Linear, Conv1d, Conv2d, Conv3d"),
    ("[attn.qkv]", r"strategy.target_modules=\['attn.qkv'\] matches no layer .* include: conv_stem"),
    ("'blocks\\.9\\..*'", r"matches no layer"),
    ("'blocks.(conv'", r"is neither auto nor a valid regex \(missing \), unterminated subpattern"),
])
def test_a_target_peft_cannot_serve_is_refused_in_one_line(tmp_path, targets, message):
    with pytest.raises(ConfigError, match=message) as refused:
        build(tiny_config(tmp_path, "lora", "test_efficientnet", f"strategy.target_modules={targets}"))
    assert "\n" not in str(refused.value)


def test_lora_targets_by_name_suffix_and_regex_as_peft_does(tmp_path):
    by_name = build(tiny_config(tmp_path, "lora", "test_vit", "strategy.target_modules=[qkv]"))[1]
    by_regex = build(tiny_config(tmp_path, "lora", "test_vit", "strategy.target_modules='blocks\\.1\\..*\\.(qkv|proj|fc1|fc2)'"))[1]
    adapted = lambda module: sorted({n.split(".lora_")[0] for n, _ in module.named_parameters() if ".lora_A." in n})
    assert adapted(by_name) == [f"backbone.blocks.{i}.attn.qkv" for i in range(len(by_name.backbone.blocks))]
    assert adapted(by_regex) == ["backbone.blocks.1.attn.proj", "backbone.blocks.1.attn.qkv",
                                 "backbone.blocks.1.mlp.fc1", "backbone.blocks.1.mlp.fc2"]


def test_each_killed_mid_epoch_and_resumed_gives_the_uninterrupted_weights_bitwise(tmp_path):
    """bitfit, norm and lora on the tiny ViT, each killed with SIGKILL at step 7 (last.ckpt at step 6, mid-epoch 2 of
    2) and resumed: bitwise the weights of an uninterrupted run. The three killed runs go at once."""
    from finetune.train import train

    strategies = ["bitfit", "norm", "lora"]
    run = lambda strategy: [*TINY, "backbone.name=test_vit", f"strategy={strategy}", "trainer.deterministic=true",
                            "callbacks.last_checkpoint.every_n_train_steps=2"]
    killed = {s: start_cli("finetune.train", *run(s), f"hydra.run.dir={tmp_path / s / 'killed'}",
                           "+callbacks.kill._target_=tests.run.faults.KillAtStep", "+callbacks.kill.step=7",
                           cwd=tmp_path, log=tmp_path / f"{s}.log") for s in strategies}
    for strategy in strategies:
        fit(compose_config(tmp_path / strategy / "straight", run(strategy)))
    for strategy, process in killed.items():
        assert process.wait(timeout=300) == -9, (tmp_path / f"{strategy}.log").read_text()[-3000:]
        checkpoint = tmp_path / strategy / "killed" / "checkpoints" / "last.ckpt"
        assert torch.load(checkpoint, weights_only=False)["global_step"] == 6
        train(compose_config(tmp_path / strategy / "killed", [*run(strategy), f"ckpt_path={checkpoint}"]))
        expected = torch.load(tmp_path / strategy / "straight" / "checkpoints" / "last.ckpt", weights_only=False)
        actual = torch.load(checkpoint, weights_only=False)
        assert expected["global_step"] == actual["global_step"] == 8
        for name, tensor in expected["state_dict"].items():
            assert torch.equal(tensor, actual["state_dict"][name]), f"{strategy}: {name} differs after resume"
        assert json.loads((tmp_path / strategy / "killed" / "param_audit.json").read_text())["violations"] == []
