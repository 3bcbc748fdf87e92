"""A checkpoint from any strategy, through finetune-eval on raw images, reproduces the test accuracy its run reported."""

from __future__ import annotations

import json

import lightning as L
import pytest

from finetune.eval import evaluate
from finetune.train import train
from tests.conftest import compose_config


@pytest.mark.parametrize("strategy", ["full", "freeze", "no_grad", "cached", "bitfit", "norm", "lora"])
def test_eval_reproduces_the_reported_test_accuracy(tiny, tmp_path, strategy):
    cfg = tiny(f"strategy={strategy}", "data.num_samples=96")
    L.seed_everything(cfg.seed)
    metrics = train(cfg)
    assert metrics["best_checkpoint"]
    eval_dir = tmp_path / "eval"
    eval_dir.mkdir()
    eval_cfg = compose_config(eval_dir, [f"ckpt_path={metrics['best_checkpoint']}", "trainer.accelerator=cpu",
                                         "trainer.enable_progress_bar=false"], config_name="eval")
    result = evaluate(eval_cfg)
    assert abs(result["test_acc"] - metrics["test_acc"]) <= 0.005
    assert json.loads((eval_dir / "eval_metrics.json").read_text())["test_acc"] == result["test_acc"]
