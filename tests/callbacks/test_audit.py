"""The freeze audit: each of its checks fires against a strategy broken on purpose, and its baseline is the model as
built, so a resumed run still proves its frozen weights equal their pretrained source."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
from hydra.utils import instantiate

from finetune.callbacks import FreezeViolationError
from finetune.strategies import FreezeBackbone
from finetune.build import build, instantiate_all
from tests.conftest import fit


class GradientIntoFrozen(FreezeBackbone):
    """Declares the backbone frozen but leaves requires_grad on: gradients reach it (it is not optimised)."""

    def prepare(self, module):
        self.restore_eval_modes(module)


class ForgetsEvalMode(FreezeBackbone):
    def restore_eval_modes(self, module):
        pass


class MissesATrainable(FreezeBackbone):
    def trainable_parameters(self, module):
        return [(n, p) for n, p in super().trainable_parameters(module) if n != "head.1.bias"]


class OptimizesFrozen(FreezeBackbone):
    def trainable_parameters(self, module):
        return list(module.named_parameters())


@pytest.mark.parametrize("broken,message", [
    (GradientIntoFrozen, r"backbone\.\S+ is frozen but received a gradient at step 0"),
    (ForgetsEvalMode, r"of a frozen part is in train mode at step 0"),
    (MissesATrainable, r"head\.1\.bias is declared trainable but is not in the optimizer"),
    (OptimizesFrozen, r"backbone\.\S+ is frozen but was handed to the optimizer"),
])
def test_each_check_fires_against_a_broken_strategy(tiny, tmp_path, broken, message):
    cfg = tiny("strategy=freeze", "trainer.max_epochs=1")
    cfg.strategy._target_ = f"{__name__}.{broken.__name__}"
    with pytest.raises(FreezeViolationError, match=message):
        fit(cfg)
    assert json.loads((tmp_path / "param_audit.json").read_text())["violations"], "the report lists it too"


class CrashAtStep(L.Callback):
    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise RuntimeError("crash")


def fit_with(cfg, *extra_callbacks, ckpt_path=None):
    L.seed_everything(cfg.seed)
    datamodule, module = build(cfg)
    trainer = instantiate(cfg.trainer, callbacks=[*instantiate_all(cfg.callbacks), *extra_callbacks],
                          logger=instantiate_all(cfg.logger))
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)


def test_a_resumed_run_is_audited_against_the_pretrained_source(tiny, tmp_path):
    """A frozen weight changed before a crash (here: in the checkpoint the run resumes from) is caught after the
    resume; an audit whose baseline were the restored checkpoint would see nothing."""
    cfg = tiny("strategy=freeze", "trainer.max_epochs=2", "callbacks.last_checkpoint.every_n_train_steps=2")
    with pytest.raises(RuntimeError, match="crash"):
        fit_with(cfg, CrashAtStep(5))
    path = tmp_path / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == 4
    checkpoint["state_dict"]["backbone.conv_stem.weight"] += 0.5
    torch.save(checkpoint, path)
    with pytest.raises(FreezeViolationError, match=r"backbone\.conv_stem\.weight is frozen but changed"):
        fit_with(cfg, ckpt_path=str(path))


def test_an_untouched_resume_passes_the_audit(tiny, tmp_path):
    cfg = tiny("strategy=freeze", "trainer.max_epochs=2", "callbacks.last_checkpoint.every_n_train_steps=2")
    with pytest.raises(RuntimeError, match="crash"):
        fit_with(cfg, CrashAtStep(5))
    fit_with(cfg, ckpt_path=str(tmp_path / "checkpoints" / "last.ckpt"))
    assert json.loads((tmp_path / "param_audit.json").read_text())["violations"] == []
