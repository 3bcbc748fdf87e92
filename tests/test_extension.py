"""A strategy, a backbone and a dataset defined outside the package train and are audited like the built-in ones."""

from __future__ import annotations

import json

import pytest
import torch

from finetune.strategies import BitFit
from tests.conftest import TESTS_DIR, TINY, compose_config, fit, initial_state, snapshot
from tests.extension.my_project import tiny_cnn

EXTENSION = [f"hydra.searchpath=[file://{TESTS_DIR / 'extension' / 'configs'}]", "backbone=tiny_cnn", "data=blobs",
             "trainer.accelerator=cpu", "trainer.max_epochs=3", "trainer.enable_progress_bar=false",
             "~callbacks.progress_bar"]


def test_a_user_peft_strategy_backbone_and_dataset_train_under_the_audit(tmp_path):
    """LoHa, written by the user on the template's peft base: only its adapters and the head change, the adapter
    merges into tiny_cnn's plain weights with the same outputs."""
    pytest.importorskip("peft")
    cfg = compose_config(tmp_path, [*EXTENSION, "strategy=loha"])
    before = initial_state(cfg)
    trainer, module, datamodule = fit(cfg, test=True)
    after = snapshot(module)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed == {n for n, _ in module.named_parameters() if n.startswith("head.") or ".hada_" in n}
    assert {n.split(".hada_")[0] for n in changed if ".hada_" in n} == {"backbone.0", "backbone.3"}
    audit = json.loads((tmp_path / "param_audit.json").read_text())
    assert audit["strategy"] == "loha" and audit["violations"] == []
    assert "test/acc" in trainer.callback_metrics
    images = datamodule.preprocess(next(iter(datamodule.test_dataloader()))[0])
    module.eval()
    with torch.no_grad():
        unmerged = module(images)
        module.strategy.merge(module)
        assert (module(images) - unmerged).abs().max() <= 1e-5
    assert set(module.backbone.state_dict()) == set(tiny_cnn().model.state_dict())


def test_a_user_rule_over_backbone_parameters_trains_only_what_it_selects(tmp_path):
    """AttentionOnly, one `selects` rule: on a ViT only the attention layers and the head change."""
    cfg = compose_config(tmp_path, [*TINY, "backbone.name=test_vit", EXTENSION[0], "strategy=attention_only"])
    before = initial_state(cfg)
    _, module, _ = fit(cfg)
    after = snapshot(module)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed == {n for n, _ in module.named_parameters() if n.startswith("head.") or ".attn." in n}
    assert json.loads((tmp_path / "param_audit.json").read_text())["violations"] == []


@pytest.mark.parametrize("strategy", ["freeze", "cached"])
def test_user_backbone_and_dataset_work_with_built_in_strategies(tmp_path, strategy):
    cfg = compose_config(tmp_path, [*EXTENSION, f"strategy={strategy}"])
    trainer, module, _ = fit(cfg)
    audit = json.loads((tmp_path / "param_audit.json").read_text())
    assert audit["violations"] == []


def test_the_audit_catches_a_strategy_that_breaks_its_promise(tmp_path):
    """A strategy that declares BN statistics frozen but lets them move must fail the run."""
    from finetune.callbacks import FreezeViolationError

    cfg = compose_config(tmp_path, [*EXTENSION, "strategy=bitfit"])
    cfg.strategy._target_ = "tests.test_extension.LeakyBitFit"
    with pytest.raises(FreezeViolationError, match="running_mean is frozen but changed"):
        fit(cfg)


class LeakyBitFit(BitFit):
    def eval_modules(self, module):
        return []  # forgets to keep BatchNorm in eval mode, so running stats update


def test_a_user_backbone_checkpoint_evaluates_through_finetune_eval(tmp_path):
    from finetune.eval import evaluate
    from finetune.train import train

    pytest.importorskip("peft")
    cfg = compose_config(tmp_path, [*EXTENSION, "strategy=loha"])
    metrics = train(cfg)
    eval_dir = tmp_path / "eval"
    eval_dir.mkdir()
    result = evaluate(compose_config(eval_dir, [f"ckpt_path={metrics['best_checkpoint']}", "trainer.accelerator=cpu",
                                                "trainer.enable_progress_bar=false", EXTENSION[0]],
                                     config_name="eval"))
    assert abs(result["test_acc"] - metrics["test_acc"]) <= 0.005


@pytest.mark.slow
@pytest.mark.parametrize("how", ["config_dir", "searchpath"])
def test_compare_finds_and_runs_a_user_strategy_from_the_users_config_folder(tmp_path, how):
    """-cd my_configs: compare listed the user's strategies but its sweep could not find them; hydra.searchpath:
    compare did not see them at all. Both now train lp_ft_tiny (it lives in tests/extension/configs only)."""
    from tests.test_cli import run_main

    configs = str(TESTS_DIR / "extension" / "configs")
    flags = ["-cd", configs] if how == "config_dir" else [f"hydra.searchpath=[file://{configs}]"]
    result = run_main("finetune.compare.cli", *flags, *TINY, "compare.strategies=[lp_ft_tiny]",
                      "compare.seeds=[1]", "compare.tune.trials=0", f"hydra.run.dir={tmp_path / 'compare'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "compare" / "lp_ft_tiny_seed1" / "metrics.json").read_text())
    assert metrics["strategy"] == "lp_ft"
