"""The feature cache hits on a second run and misses when anything that determines the features changes."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from finetune.data.cached import PROBE_SAMPLES
from finetune.data.feature_cache import FeatureCache
from finetune.train import build


def prepared(cfg, backbone_calls: list[int]):
    L.seed_everything(cfg.seed)  # the tiny backbone is randomly initialised: same seed, same weights
    datamodule, module = build(cfg)
    module.backbone.register_forward_hook(lambda _, args, __: backbone_calls.append(len(args[0])))
    datamodule.setup("fit")
    return datamodule


def test_second_run_with_the_same_key_reuses_features_without_running_the_backbone(tiny, caplog):
    first_calls, second_calls = [], []
    first = prepared(tiny("strategy=cached"), first_calls)
    assert first_calls and first.report["cache_hit"] is False
    caplog.set_level("INFO")
    second = prepared(tiny("strategy=cached"), second_calls)
    assert sum(second_calls) <= 3 * PROBE_SAMPLES, "a hit runs the backbone only on the probe samples of each split"
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


def build_cache_in_child(cache_dir: str, output_dir: str) -> dict:
    """Run in a separate process: compose the tiny cached config and fill (or read) the shared cache."""
    from pathlib import Path

    from tests.conftest import TINY, compose_config

    cfg = compose_config(Path(output_dir), [*TINY, "strategy=cached", f"paths.cache_dir={cache_dir}"])
    calls: list[int] = []
    datamodule = prepared(cfg, calls)
    return {"hit": datamodule.report["cache_hit"], "backbone_calls": sum(calls),
            "train": datamodule.splits["train"]["features"]}


def test_two_processes_building_the_same_entry_both_succeed_and_leave_one_valid_entry(tmp_path):
    import multiprocessing

    cache_dir = tmp_path / "shared-cache"
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        results = pool.starmap(build_cache_in_child, [(str(cache_dir), str(tmp_path / "a")),
                                                      (str(cache_dir), str(tmp_path / "b"))])
    assert sorted(r["hit"] for r in results) == [False, True], "one builds under the lock, the other reuses it"
    torch.testing.assert_close(results[0]["train"], results[1]["train"])
    cache = FeatureCache(cache_dir)
    assert len(cache.entries()) == 3 and not list(cache_dir.glob(".*.tmp"))
    for entry in cache.entries():
        assert cache.load(entry["key"]) is not None


def test_an_unwritable_cache_directory_falls_back_to_memory_and_says_so(tiny, tmp_path, caplog):
    import os

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    if os.geteuid() == 0:
        cache_dir = blocker / "cache"  # root ignores permission bits; a path through a file is unwritable for anyone
    else:
        cache_dir = tmp_path / "read-only"
        cache_dir.mkdir(mode=0o555)
    calls: list[int] = []
    datamodule = prepared(tiny("strategy=cached", f"paths.cache_dir={cache_dir}"), calls)
    assert calls and datamodule.splits["train"]["features"].shape[0] == 64
    assert "features stay in memory for this run" in caplog.text


def test_cache_cli_lists_sizes_and_clears(tiny, tmp_path, capsys):
    from finetune.data.cache_cli import main as cache_main

    first = prepared(tiny("strategy=cached"), [])
    cache_dir = str(first.cache.root)
    assert cache_main(["list", "--cache-dir", cache_dir]) == 0
    listing = capsys.readouterr().out
    assert "3 entries" in listing and "test_efficientnet" in listing and "train" in listing and "KiB" in listing
    assert cache_main(["clear", "--cache-dir", cache_dir]) == 0
    assert "freed" in capsys.readouterr().out and FeatureCache(cache_dir).entries() == []


# -- whatever decides the stored numbers changes the key, or is caught on the hit --------------------------------
def test_a_constructor_argument_that_changes_the_forward_but_no_weight_misses(tiny):
    prepared(tiny("strategy=cached"), [])
    calls: list[int] = []
    changed = prepared(tiny("strategy=cached", "+backbone.global_pool=max"), calls)
    assert changed.report["cache_hit"] is False and sum(calls) > 3 * PROBE_SAMPLES


def test_another_extraction_mode_misses(tiny, monkeypatch):
    from finetune.data import cached

    first = prepared(tiny("strategy=cached"), [])
    # what a GPU run does (bf16 autocast), here on the CPU: the same weights, other numbers
    monkeypatch.setattr(cached, "extraction_mode",
                        lambda device: {"device": device.type, "autocast": "bfloat16", "channels_last": False})
    changed = prepared(tiny("strategy=cached"), [])
    assert changed.report["cache_hit"] is False
    assert changed.report["cache_keys"]["train"] != first.report["cache_keys"]["train"]
    assert not torch.equal(changed.splits["train"]["features"], first.splits["train"]["features"])


def test_other_library_versions_miss(tiny, monkeypatch):
    import timm

    prepared(tiny("strategy=cached"), [])
    monkeypatch.setattr(timm, "__version__", "99.0.0")
    assert prepared(tiny("strategy=cached"), []).report["cache_hit"] is False


def test_a_change_the_key_cannot_see_is_caught_by_the_probe(tiny, caplog):
    first = prepared(tiny("strategy=cached"), [])
    cfg = tiny("strategy=cached")
    L.seed_everything(cfg.seed)
    datamodule, module = build(cfg)
    module.backbone.register_forward_hook(lambda _, __, output: output * 2)  # same weights, same key, other numbers
    datamodule.setup("fit")
    assert datamodule.report["cache_keys"] == first.report["cache_keys"]
    assert datamodule.report["cache_hit"] is False and "is stale" in caplog.text
    torch.testing.assert_close(datamodule.splits["train"]["features"], 2 * first.splits["train"]["features"])


def test_clear_removes_only_cache_entries(tiny, tmp_path):
    from finetune.data.cache_cli import main as cache_main

    first = prepared(tiny("strategy=cached"), [])
    root = first.cache.root
    keep = {"metrics.json": '{"test_acc": 0.9}', "param_audit.json": "{}", "last.ckpt": "weights",
            "notes.pt": "not ours", "0123.json": '{"key": "0123"}'}
    for name, text in keep.items():
        (root / name).write_text(text)
    assert cache_main(["clear", "--cache-dir", str(root)]) == 0
    assert sorted(p.name for p in root.iterdir()) == sorted(keep), "only the three entries and their locks went"
