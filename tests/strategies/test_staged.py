"""Staged fine-tuning: gradual unfreezing and LP-FT, per-group learning rates, the per-phase audit, resume and DDP."""

from __future__ import annotations

import json
import math

import lightning as L
import pytest
import torch
from torch.nn.modules.batchnorm import _BatchNorm

from finetune.callbacks.freeze_audit import FreezeViolationError
from finetune.errors import ConfigError
from finetune.run.names import under_any as under
from finetune.strategies.gradual import GradualUnfreezing, parse_phases
from finetune.train import train
from tests.conftest import TINY, compose_config, fit
from tests.test_cli import run_cli, start_cli

# 64 fake images in batches of 16: 4 steps an epoch. test_efficientnet's top two layers (timm's group_matcher) are
# blocks.4 + conv_head + bn2, then blocks.3.
PHASES = ("strategy.phases=[{name:head,epochs:1,train:[head],lr:0.01},{name:top,epochs:1,train:['top:2']},"
          "{name:all,epochs:null,train:[all],lr_mult:{backbone:0.5}}]")
GRADUAL = ["strategy=gradual", PHASES, "trainer.max_epochs=4", "optimizer.lr=1e-3"]
TOP = ("backbone.blocks.4", "backbone.conv_head", "backbone.bn2", "backbone.blocks.3")


class Recorder(L.Callback):
    """Per optimizer step: each group's lr, the BatchNorm modes and requires_grad flags, the head's weights."""

    def __init__(self):
        self.steps: list[dict] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.steps.append({
            "step": trainer.global_step, "epoch": trainer.current_epoch, "input_ndim": batch[0].ndim,
            "lrs": {g["name"]: g["lr"] for g in trainer.optimizers[0].param_groups},
            "bn_training": {n: m.training for n, m in module.named_modules() if isinstance(m, _BatchNorm)},
            "requires_grad": {n for n, p in module.named_parameters() if p.requires_grad},
            "head": {n: p.detach().clone() for n, p in module.head.named_parameters()}})

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.steps[-1]["head_after"] = {n: p.detach().clone() for n, p in module.head.named_parameters()}


def fit_recorded(cfg):
    recorder = Recorder()
    L.seed_everything(cfg.seed, workers=True)
    from finetune.config import instantiate
    from finetune.build import build, instantiate_all


    datamodule, module = build(cfg)
    trainer = instantiate(cfg.trainer, callbacks=[*instantiate_all(cfg.callbacks), recorder],
                          logger=instantiate_all(cfg.logger))
    trainer.fit(module, datamodule=datamodule)
    audit = next(c for c in trainer.callbacks if type(c).__name__ == "FreezeAudit")
    return recorder.steps, audit.report, module


def shape(step: int, length: int) -> float:
    """The default schedule written out: linear warmup from 1% over 5% of the segment (at least a step), cosine to 1%."""
    warmup = min(max(int(length * 0.05), 1), length - 1)
    if step < warmup:
        return 0.01 + 0.99 * step / warmup
    return 0.01 + 0.99 * (1 + math.cos(math.pi * (step - warmup) / (length - warmup))) / 2


def test_every_group_follows_its_phase_lr_times_multiplier_times_the_schedule(tmp_path):
    cfg = compose_config(tmp_path, [*TINY, *GRADUAL])
    steps, audit, _ = fit_recorded(cfg)
    assert [s["step"] for s in steps] == list(range(16))
    assert set(steps[0]["lrs"]) == {"head", "head/no_decay", "backbone", "backbone/no_decay"}
    # phases start at steps 0, 4 and 8 (an epoch each, the last until step 16); each restarts warmup + cosine
    segments = [(0, 4, 0.01 / 1e-3, 1.0), (4, 4, 1.0, 1.0), (8, 8, 1.0, 0.5)]
    for record in steps:
        start, length, phase_ratio, backbone_mult = next(seg for seg in reversed(segments) if seg[0] <= record["step"])
        factor = shape(record["step"] - start, length)
        assert record["lrs"]["head"] == pytest.approx(1e-3 * phase_ratio * factor, rel=1e-9), record["step"]
        assert record["lrs"]["backbone"] == pytest.approx(1e-3 * phase_ratio * backbone_mult * factor, rel=1e-9)
    # the step before a boundary is at the cosine's floor, the step after it is warming up again at the new phase's lr
    assert steps[7]["lrs"]["head"] == pytest.approx(1e-3 * 0.01 + 1e-3 * 0.99 * (1 + math.cos(math.pi * 2 / 3)) / 2)
    assert steps[8]["lrs"]["head"] == pytest.approx(1e-3 * 0.01)
    assert audit["violations"] == []


def test_layer_decay_gives_each_timm_layer_its_own_named_group_with_a_real_lr(tmp_path):
    cfg = compose_config(tmp_path, [*TINY, "strategy=full", "optimizer.lr=1e-3", "optimizer.layer_decay=0.5",
                                    "optimizer.lr_mult={conv_stem:2.0}", "scheduler=constant", "++trainer.max_steps=1", "trainer.log_every_n_steps=1",
                                    "logger=csv"])
    trainer, module, _ = fit(cfg)
    groups = {g["name"]: g for g in trainer.optimizers[0].param_groups}
    # timm's group_matcher for test_efficientnet: stem, blocks.0.0 .. blocks.3.0, blocks.4.0 + conv_head + bn2; the head
    # is the top layer
    assert groups["head"]["lr"] == pytest.approx(1e-3)
    assert groups["blocks.4.0+conv_head+bn2"]["lr"] == pytest.approx(1e-3 * 0.5)
    assert groups["blocks.0.0"]["lr"] == pytest.approx(1e-3 * 0.5 ** 5)
    assert groups["conv_stem"]["lr"] == pytest.approx(2e-3), "an explicit multiplier overrides layer decay"
    assert groups["conv_stem+bn1/no_decay"]["lr"] == pytest.approx(1e-3 * 0.5 ** 6), "the rest of the stem layer"
    assert all("lr_scale" not in g for g in groups.values())
    header = next(tmp_path.glob("**/metrics.csv")).read_text().splitlines()[0].split(",")
    assert {"lr/head", "lr/blocks.0.0", "lr/conv_stem"} <= set(header), "the LR monitor logs groups by name"
    with pytest.raises(ConfigError, match="optimizer.lr_mult entry 'nope' names no submodule of the backbone"):
        fit(compose_config(tmp_path, [*TINY, "strategy=full", "optimizer.lr_mult={nope:2.0}", "++trainer.max_steps=1"]))


def test_lr_mult_head_is_the_classifier_head_never_a_backbone_part_named_head(tmp_path):
    """ConvNeXt keeps its final norm at backbone.head.norm: `head` in optimizer.lr_mult and in a phase's lr_mult is
    the classifier head only; the backbone's head.norm takes the backbone's multiplier (or its own, by name)."""
    convnext = ["backbone.name=test_convnext", "strategy=full", "optimizer.lr=1e-3", "scheduler=constant",
                "++trainer.max_steps=1"]
    _, module, _ = fit(compose_config(tmp_path, [*TINY, *convnext, "optimizer.lr_mult={head:1.0,backbone:0.1}"]))
    lr_of = {id(p): g["lr"] for g in module.trainer.optimizers[0].param_groups for p in g["params"]}
    assert lr_of[id(module.backbone.head.norm.weight)] == pytest.approx(1e-4), "the backbone's own head.norm"
    assert lr_of[id(module.head[-1].weight)] == pytest.approx(1e-3)
    _, module, _ = fit(compose_config(tmp_path, [*TINY, *convnext, "optimizer.lr_mult={head.norm:0.5,backbone:0.1}"]))
    lr_of = {id(p): g["lr"] for g in module.trainer.optimizers[0].param_groups for p in g["params"]}
    assert lr_of[id(module.backbone.head.norm.weight)] == pytest.approx(5e-4), "named as a backbone part"
    from finetune.optim import param_groups

    named = list(module.named_parameters())
    _, phase_mults = param_groups(module, named, 1e-3, 0.0, phase_lr_mults=[{"head": 2.0, "backbone": 0.5}])
    groups, _ = param_groups(module, named, 1e-3, 0.0, phase_lr_mults=[{"head": 2.0, "backbone": 0.5}])
    mult_of = {id(p): mults[0] for g, mults in zip(groups, phase_mults) for p in g["params"]}
    assert mult_of[id(module.backbone.head.norm.weight)] == 0.5 and mult_of[id(module.head[-1].weight)] == 2.0


def test_position_embeddings_and_tokens_get_no_weight_decay(tmp_path):
    """timm's ViT names what must not decay (no_weight_decay(): pos_embed, cls_token); ndim > 1 alone would decay
    them."""
    _, module, _ = fit(compose_config(tmp_path, [*TINY, "backbone.name=test_vit", "strategy=full",
                                                 "optimizer.weight_decay=0.05", "++trainer.max_steps=1"]))
    decay_of = {id(p): g["weight_decay"] for g in module.trainer.optimizers[0].param_groups for p in g["params"]}
    assert decay_of[id(module.backbone.pos_embed)] == 0.0 and decay_of[id(module.backbone.cls_token)] == 0.0
    assert decay_of[id(module.backbone.blocks[0].attn.qkv.weight)] == 0.05 and decay_of[id(module.head[-1].weight)] == 0.05


@pytest.mark.parametrize("strategy", [GRADUAL, ["strategy=freeze"]], ids=["gradual", "freeze"])
def test_frozen_batchnorm_stays_in_eval_after_lightning_swaps_the_modules(tmp_path, strategy):
    """trainer.sync_batchnorm=true replaces every BatchNorm after the strategy's prepare(); a strategy that held the
    old module objects put only those back into eval, and the new, frozen ones trained. Simulated on the
    CPU by a strategy that swaps the modules where Lightning's layer sync does."""
    cfg = compose_config(tmp_path, [*TINY, *strategy, "++trainer.max_steps=4",
                                    "+trainer.strategy._target_=tests.run.faults.BatchNormSwappingStrategy",
                                    "+trainer.strategy.device=cpu", "+callbacks.bn._target_=tests.run.faults.RecordBatchNormModes",
                                    f"+callbacks.bn.output_dir={tmp_path}"])
    _, module, _ = fit(cfg)
    training = json.loads((tmp_path / "bn_training.json").read_text())  # 2 steps an epoch on rank 0's half
    first_phase = [names for epoch, names in training if epoch == 0]
    assert len(first_phase) == 2 and first_phase == [[], []], f"frozen BatchNorm in train mode: {first_phase}"
    assert json.loads((tmp_path / "param_audit.json").read_text())["violations"] == []


@pytest.mark.parametrize("train_bn,freeze_bn_stats", [(False, False), (True, False), (False, True)])
def test_each_phase_trains_its_parts_with_frozen_batchnorm_in_eval_and_the_audit_proves_it(tmp_path, train_bn,
                                                                                          freeze_bn_stats):
    cfg = compose_config(tmp_path, [*TINY, *GRADUAL, f"strategy.train_bn={str(train_bn).lower()}",
                                    f"strategy.freeze_bn_stats={str(freeze_bn_stats).lower()}"])
    steps, audit, module = fit_recorded(cfg)
    stem_bn, top_bn = "backbone.bn1", "backbone.blocks.4.0.bn1"
    for record in steps:
        phase = min(record["epoch"], 2)
        assert record["bn_training"][top_bn] == ((phase >= 1 or train_bn) and not freeze_bn_stats), record["step"]
        assert record["bn_training"][stem_bn] == ((phase >= 2 or train_bn) and not freeze_bn_stats), record["step"]
        unfrozen = {0: ("head",), 1: ("head", *TOP), 2: ("head", "backbone")}[phase]
        expected = {n for n, _ in module.named_parameters() if under(n, unfrozen)}
        if train_bn:
            expected |= {n for n, _ in module.named_parameters()
                         if isinstance(module.get_submodule(n.rsplit(".", 1)[0]), _BatchNorm)}
        assert record["requires_grad"] == expected, f"step {record['step']}"
    assert [p["name"] for p in audit["phases"]] == ["head", "top", "all"]
    assert audit["violations"] == []
    head_phase, top_phase, all_phase = audit["phases"]
    bn = lambda n: isinstance(module.get_submodule(n.rsplit(".", 1)[0]), _BatchNorm)
    assert all(under(n, ["head"]) or (train_bn and bn(n)) for n in head_phase["changed_names"])
    assert all(under(n, ["head", *TOP]) or (train_bn and bn(n)) for n in top_phase["changed_names"])
    assert any(n.startswith("backbone.blocks.4") for n in top_phase["changed_names"])
    assert any(n.startswith("backbone.conv_stem") for n in all_phase["changed_names"])
    assert head_phase["in_optimizer"] == top_phase["in_optimizer"] == len(list(module.parameters()))
    buffers = [n for n, _ in module.named_buffers() if ".running_" in n]
    assert any(n in all_phase["changed_names"] for n in buffers) != freeze_bn_stats, \
        "freeze_bn_stats: every running statistic stays the pretrained one, also once its part is unfrozen"


class TouchFrozenStem(L.Callback):
    """Moves a parameter that the `top` phase keeps frozen, in that phase."""

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if trainer.current_epoch == 1:
            with torch.no_grad():
                module.backbone.conv_stem.weight.add_(1e-3)


def test_the_audit_fails_a_run_whose_frozen_part_changes_within_a_phase(tmp_path):
    cfg = compose_config(tmp_path, [*TINY, *GRADUAL, "+callbacks.touch._target_=tests.strategies.test_staged.TouchFrozenStem"])
    with pytest.raises(FreezeViolationError, match=r"backbone\.conv_stem\.weight is frozen in phase 1 but changed"):
        fit(cfg)


def test_lp_ft_probes_on_cached_features_then_finetunes_from_exactly_that_head(tmp_path):
    overrides = [*TINY, "strategy=lp_ft", "strategy.probe_epochs=2", "trainer.max_epochs=3"]
    steps, audit, _ = fit_recorded(compose_config(tmp_path, overrides))
    assert [s["input_ndim"] for s in steps] == [2] * 8 + [4] * 4, "features for the probe, images after it"
    last_probe, first_finetune = steps[7], steps[8]
    for name in last_probe["head_after"]:
        assert torch.equal(last_probe["head_after"][name], first_finetune["head"][name]), name
    assert audit["phases"][0]["inputs"] == "cached" and audit["phases"][0]["changed_names"] == ["head.1.weight",
                                                                                              "head.1.bias"]
    assert first_finetune["lrs"]["head"] == pytest.approx(3e-4 * 0.01), "phase 2 warms up from its own lr"
    # the run's metrics: drift of the backbone's features, and a cache hit for the second run's probe
    metrics = train(compose_config(tmp_path, [*overrides, "trainer.max_epochs=3"]))
    assert metrics["cache_hit"] is True and metrics["phases"] == 2
    # drift is that of the tested (best) checkpoint: none while only the head had trained
    best_epoch = int(metrics["best_checkpoint"].rsplit("epoch_", 1)[1][:3])
    assert (metrics["feature_drift"] > 0) == (best_epoch >= 2), (best_epoch, metrics["feature_drift"])


def test_feature_drift_is_exactly_zero_when_the_backbone_is_frozen(tmp_path):
    metrics = train(compose_config(tmp_path, [*TINY, "strategy=freeze", "trainer.max_epochs=1"]))
    assert metrics["feature_drift"] == 0.0
    from finetune.compare.report import validation_curve

    curve = validation_curve(tmp_path)
    assert len(curve) == 1 and curve[0][0] > 0 and 0 <= curve[0][1] <= 1, "val/acc against seconds from the CSV log"


def test_feature_drift_is_measured_without_the_audit_callback(tmp_path):
    """callbacks=none turns the freeze audit off, whose snapshot feature_drift read: it disappeared without a word
   ; train() now keeps its own snapshot of the backbone as built."""
    audited = train(compose_config(tmp_path / "a", [*TINY, "strategy=full", "trainer.max_epochs=1"]))
    without = [o for o in TINY if o != "~callbacks.progress_bar"]
    alone = train(compose_config(tmp_path / "b", [*without, "strategy=full", "trainer.max_epochs=1", "callbacks=none"]))
    assert "audit_violations" not in alone and alone["feature_drift"] > 0
    assert alone["feature_drift"] == pytest.approx(audited["feature_drift"], rel=1e-5)


@pytest.mark.parametrize("phases,message", [
    ([], "strategy.phases is empty"),
    ([{"epochs": 1, "train": ["head"], "epoch": 2}], "strategy.phases[0] has unknown key 'epoch'; valid keys: epochs"),
    ([{"epochs": None, "train": ["head"]}, {"epochs": 1, "train": ["all"]}],
     "strategy.phases[0].epochs is null; only the last phase"),
    ([{"epochs": 1, "train": []}], "strategy.phases[0].train is empty"),
    ([{"epochs": 1, "train": ["head"]}, {"epochs": 1, "train": ["all"], "inputs": "cached"}],
     "strategy.phases[1].inputs=cached needs the head to be all"),
    ([{"epochs": 1, "train": ["head"], "schedule": "later"}],
     "strategy.phases[0].schedule='later'; choose one of: restart, continue"),
])
def test_bad_schedules_are_refused_in_one_line(phases, message):
    with pytest.raises(ConfigError, match="^" + message.replace("[", r"\[").replace("]", r"\]")):
        parse_phases(phases)


@pytest.mark.parametrize("train,message", [
    ([["head"], ["blocks.1"], ["blocks.1.0"]], "strategy.phases[2].train entry 'blocks.1.0' overlaps 'blocks.1'"),
    ([["head", "all"], ["blocks.1"]], "strategy.phases[1].train entry 'blocks.1' overlaps 'all'"),
    ([["head"], ["top:2"], ["blocks.4"]], "strategy.phases[2].train entry 'blocks.4' overlaps 'top:2'"),
    ([["head"], ["top:2"], ["top:1"]], "strategy.phases[2].train entry 'top:1' adds no layer"),
    ([["head"], ["nope"]], "strategy.phases[1].train entry 'nope' names no submodule of the backbone; choices: head"),
])
def test_unknown_and_overlapping_parts_are_refused_like_strategy_modules(tiny, train, message):
    from finetune.build import build_images_and_module

    phases = [{"epochs": 1, "train": t} for t in train]
    cfg = tiny("strategy=gradual", f"trainer.max_epochs={len(train)}")
    cfg.strategy.phases = phases
    with pytest.raises(ConfigError, match="^" + message.replace("[", r"\[").replace("]", r"\]")):
        build_images_and_module(cfg)


def test_phases_and_max_epochs_must_agree():
    strategy = GradualUnfreezing([{"epochs": 2, "train": ["head"]}, {"epochs": 3, "train": ["all"]}])
    with pytest.raises(ConfigError, match="cover 5 epochs but trainer.max_epochs=8; set trainer.max_epochs=5"):
        strategy.check_epochs(8)
    with pytest.raises(ConfigError, match="need 5 epochs or more but trainer.max_epochs=4"):
        strategy.check_epochs(4)
    strategy.check_epochs(5)


def _weights(run_dir):
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)


def test_lp_ft_killed_mid_probe_at_the_boundary_and_mid_finetune_resumes_bitwise(tmp_path):
    """One run killed three times: last.ckpt mid-phase-1 (step 2), at the phase boundary (step 8, the probe's end)
    and mid-phase-2 (step 10), resumed each time; its weights, param groups and per-step lrs equal an uninterrupted
    run's."""
    run = [*TINY, "strategy=lp_ft", "strategy.probe_epochs=2", "trainer.max_epochs=4", "trainer.deterministic=true",
           "callbacks.last_checkpoint.every_n_train_steps=2", f"paths.cache_dir={tmp_path / 'cache'}",
           "+callbacks.lrs._target_=tests.run.faults.RecordLearningRates"]
    killed_dir, checkpoint = tmp_path / "killed", tmp_path / "killed" / "checkpoints" / "last.ckpt"
    logged = [f"hydra.run.dir={killed_dir}", f"+callbacks.lrs.path={tmp_path / 'killed.jsonl'}"]
    kill = lambda step: ["+callbacks.kill._target_=tests.run.faults.KillAtStep", f"+callbacks.kill.step={step}"]
    # the killed run's first try in a process of its own (SIGKILL); the uninterrupted run meanwhile in this one
    first = start_cli("finetune.train", *run, *logged, *kill(3), cwd=tmp_path, log=tmp_path / "killed.log")
    (tmp_path / "straight").mkdir()
    train(compose_config(tmp_path / "straight", [*run, f"+callbacks.lrs.path={tmp_path / 'straight.jsonl'}"]))
    assert first.wait(timeout=300) == -9, (tmp_path / "killed.log").read_text()[-3000:]
    assert _weights(killed_dir)["global_step"] == 2
    for kill_at, saved_step in ((9, 8), (11, 10)):
        killed = run_cli("finetune.train", *run, *logged, f"ckpt_path={checkpoint}", *kill(kill_at), cwd=tmp_path)
        assert killed.returncode == -9, killed.stderr[-3000:]
        assert _weights(killed_dir)["global_step"] == saved_step
    train(compose_config(killed_dir, [*run, logged[1], f"ckpt_path={checkpoint}"]))  # the last resume, in-process

    expected, actual = _weights(tmp_path / "straight"), _weights(killed_dir)
    for name in expected["state_dict"]:
        assert torch.equal(expected["state_dict"][name], actual["state_dict"][name]), f"{name} differs after resume"
    groups = lambda ckpt: [(g["lr"], len(g["params"])) for g in ckpt["optimizer_states"][0]["param_groups"]]
    assert groups(expected) == groups(actual), "the same param groups, none duplicated"
    straight_lrs = {r["step"]: r for r in map(json.loads, (tmp_path / "straight.jsonl").read_text().splitlines())}
    for record in map(json.loads, (tmp_path / "killed.jsonl").read_text().splitlines()):
        assert record == straight_lrs[record["step"]], f"lrs at step {record['step']}"
    audit = json.loads((killed_dir / "param_audit.json").read_text())
    assert audit["violations"] == [] and audit["phases"][0]["resumed"] and audit["phases"][0]["phase"] == 1
    assert audit["phases"][0]["trainable"] == audit["summary"]["trainable"], "finetune: everything trainable again"


# DDP, every phase and identical ranks after each: tests/run/test_ddp.py (gradual_tiny, lp_ft_tiny in its sweeps)
