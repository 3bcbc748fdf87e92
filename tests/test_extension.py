"""A strategy, a backbone and a dataset defined outside the package train and are audited like the built-in ones."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import TESTS_DIR, compose_config, fit, initial_state, snapshot

EXTENSION = [f"hydra.searchpath=[file://{TESTS_DIR / 'extension' / 'configs'}]", "backbone=tiny_cnn", "data=blobs",
             "trainer.accelerator=cpu", "trainer.max_epochs=3", "trainer.enable_progress_bar=false",
             "~callbacks.progress_bar"]


def test_user_strategy_backbone_and_dataset_train_under_the_audit(tmp_path):
    cfg = compose_config(tmp_path, [*EXTENSION, "strategy=bitfit"])
    before = initial_state(cfg)
    trainer, module, _ = fit(cfg, test=True)
    after = snapshot(module)
    for name in before:
        if name.startswith("backbone."):
            assert torch.equal(before[name], after[name]) != name.endswith(".bias"), name
    audit = json.loads((tmp_path / "param_audit.json").read_text())
    assert audit["strategy"] == "bitfit" and audit["violations"] == []
    assert "test/acc" in trainer.callback_metrics


@pytest.mark.parametrize("strategy", ["freeze", "cached"])
def test_user_backbone_and_dataset_work_with_built_in_strategies(tmp_path, strategy):
    cfg = compose_config(tmp_path, [*EXTENSION, f"strategy={strategy}"])
    trainer, module, _ = fit(cfg)
    audit = json.loads((tmp_path / "param_audit.json").read_text())
    assert audit["violations"] == []


def test_the_audit_catches_a_strategy_that_breaks_its_promise(tmp_path):
    """A strategy that declares the backbone frozen but lets BN statistics move must fail the run."""
    from finetune.callbacks import FreezeViolationError

    cfg = compose_config(tmp_path, [*EXTENSION, "strategy=bitfit"])
    cfg.strategy._target_ = "tests.test_extension.LeakyBitFit"
    with pytest.raises(FreezeViolationError, match="running_mean is frozen but changed"):
        fit(cfg)


from tests.extension.bitfit import BitFit  # noqa: E402


class LeakyBitFit(BitFit):
    def eval_modules(self, module):
        return []  # forgets to keep BatchNorm in eval mode, so running stats update


def test_a_user_backbone_checkpoint_evaluates_through_finetune_eval(tmp_path):
    from finetune.eval import evaluate
    from finetune.train import train

    cfg = compose_config(tmp_path, [*EXTENSION, "strategy=bitfit"])
    metrics = train(cfg)
    eval_dir = tmp_path / "eval"
    eval_dir.mkdir()
    result = evaluate(compose_config(eval_dir, [f"ckpt_path={metrics['best_checkpoint']}", "trainer.accelerator=cpu",
                                                "trainer.enable_progress_bar=false", EXTENSION[0]],
                                     config_name="eval"))
    assert abs(result["test_acc"] - metrics["test_acc"]) <= 0.005
