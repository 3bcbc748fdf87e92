"""The feature cache hits on a second run and misses when anything that determines the features changes."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from finetune.data.feature_cache import FeatureCache
from finetune.train import build


def prepared(cfg, backbone_calls: list[int]):
    L.seed_everything(cfg.seed)  # the tiny backbone is randomly initialised: same seed, same weights
    datamodule, module = build(cfg)
    module.backbone.register_forward_hook(lambda *_: backbone_calls.append(1))
    datamodule.setup("fit")
    return datamodule


def test_second_run_with_the_same_key_reuses_features_without_running_the_backbone(tiny, caplog):
    first_calls, second_calls = [], []
    first = prepared(tiny("strategy=cached"), first_calls)
    assert first_calls and first.report["cache_hit"] is False
    caplog.set_level("INFO")
    second = prepared(tiny("strategy=cached"), second_calls)
    assert second_calls == [], "a cache hit must not run the backbone over the data"
    assert second.report["cache_hit"] is True and "feature cache hit" in caplog.text
    for split in ("train", "val", "test"):
        assert torch.equal(first.splits[split]["features"], second.splits[split]["features"])


@pytest.mark.parametrize("change", [
    "data.image_size=24",
    "data.mean=[0.5,0.5,0.5]",
    "strategy.feature_dtype=float16",
])
def test_a_changed_key_misses(tiny, change):
    prepared(tiny("strategy=cached"), [])
    calls: list[int] = []
    changed = prepared(tiny("strategy=cached", change), calls)
    assert calls and changed.report["cache_hit"] is False


def test_changed_weights_miss(tiny):
    prepared(tiny("strategy=cached"), [])
    cfg = tiny("strategy=cached")
    L.seed_everything(cfg.seed)
    datamodule, module = build(cfg)
    with torch.no_grad():
        module.backbone.conv_stem.weight.mul_(1.01)
    datamodule.setup("fit")
    assert datamodule.report["cache_hit"] is False


def test_a_changed_split_misses(tmp_path):
    from tests.conftest import TINY, compose_config

    base = [o for o in TINY if not o.startswith("data")]
    digits = ["data=digits", "data.image_size=16", "strategy=cached"]
    prepared(compose_config(tmp_path, [*base, *digits]), [])
    calls: list[int] = []
    resplit = prepared(compose_config(tmp_path, [*base, *digits, "data.split_seed=1"]), calls)
    assert calls and resplit.report["cache_hit"] is False


def test_damaged_entry_is_detected_and_rebuilt(tiny, caplog):
    first = prepared(tiny("strategy=cached"), [])
    key = first.report["cache_keys"]["train"]
    data_file = first.cache.root / f"{key}.pt"
    data_file.write_bytes(data_file.read_bytes()[:100])  # truncated
    calls: list[int] = []
    again = prepared(tiny("strategy=cached"), calls)
    assert calls, "a damaged entry must be rebuilt"
    assert "damaged" in caplog.text
    assert FeatureCache(first.cache.root).load(key) is not None, "the rebuilt entry is whole"
    torch.testing.assert_close(again.splits["train"]["features"], first.splits["train"]["features"])
