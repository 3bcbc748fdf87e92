"""End to end on real data: the bundled ImageNet EfficientNet-Lite0 on scikit-learn's digits."""

from __future__ import annotations

import lightning as L
import pytest

from finetune.train import train
from tests.conftest import compose_config

QUIET = ["trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "~callbacks.progress_bar",
         "trainer.accelerator=cpu"]


def run(tmp_path, name: str, *overrides: str) -> dict:
    cfg = compose_config(tmp_path / name, [*QUIET, *overrides])
    L.seed_everything(cfg.seed)
    return train(cfg)


@pytest.mark.slow
def test_cached_with_its_defaults_reaches_85_percent(tmp_path):
    metrics = run(tmp_path, "cached")  # the default strategy, data, backbone and epochs
    assert metrics["strategy"] == "cached" and metrics["backbone"] == "efficientnet_lite0"
    assert metrics["test_acc"] >= 0.85, metrics


@pytest.mark.slow
def test_full_finetuning_from_pretrained_beats_random_init(tmp_path):
    budget = ["strategy=full", "data.image_size=32", "trainer.max_epochs=2", "~callbacks.model_checkpoint"]
    pretrained = run(tmp_path, "pretrained", *budget)
    scratch = run(tmp_path, "scratch", *budget, "backbone.pretrained=false")
    assert pretrained["test_acc"] > scratch["test_acc"] + 0.05, (pretrained["test_acc"], scratch["test_acc"])
