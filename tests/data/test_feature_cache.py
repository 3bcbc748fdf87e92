"""The feature cache: hits on a second run, misses when anything that determines the features changes, and at scale
stores sharded memory maps that survive a kill, a damaged shard, a full disk and a flipped byte."""

from __future__ import annotations

import errno
import json
import logging

import lightning as L
import pytest
import torch

from finetune.data.storage import shard_checks, shard_store, shard_writing
from finetune.data.features.extraction import PROBE_SAMPLES
from finetune.data.features.cache import FeatureCache
from finetune.data.storage.shard_store import StoreWriteError
from finetune.build import build
from tests.conftest import fit, snapshot

SHARDED = ["strategy=cached", "strategy.shard_rows=16"]  # 64 train rows: 4 shards; val and test 16 rows: 1 each


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
    assert second.report["cache_hit"] is True and second.report["rows_extracted"] == 0
    for split in ("train", "val", "test"):
        assert torch.equal(first.features(split), second.features(split))
        assert torch.equal(first.labels(split), first.images.splits[split][1])


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


def build_cache_in_child(cache_dir: str, output_dir: str) -> dict:
    """Run in a separate process: compose the tiny cached config and fill (or read) the shared cache."""
    from pathlib import Path

    from tests.conftest import TINY, compose_config

    cfg = compose_config(Path(output_dir), [*TINY, *SHARDED, f"paths.cache_dir={cache_dir}"])
    calls: list[int] = []
    datamodule = prepared(cfg, calls)
    return {"hit": datamodule.report["cache_hit"], "backbone_calls": sum(calls), "train": datamodule.features("train")}


def test_two_processes_building_the_same_entry_both_succeed_and_leave_one_valid_entry(tmp_path):
    import multiprocessing

    cache_dir = tmp_path / "shared-cache"
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        results = pool.starmap(build_cache_in_child, [(str(cache_dir), str(tmp_path / "a")),
                                                      (str(cache_dir), str(tmp_path / "b"))])
    assert sorted(r["hit"] for r in results) == [False, True], "one builds under the lock, the other reuses it"
    torch.testing.assert_close(results[0]["train"], results[1]["train"])
    cache = FeatureCache(cache_dir)
    assert len(cache.entries()) == 3 and not list(cache_dir.rglob(".*.tmp"))
    for entry in cache.entries():
        assert entry.complete and entry.verify() == {}


def test_an_unwritable_cache_directory_falls_back_to_a_temporary_folder_and_says_so(tiny, tmp_path, caplog):
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
    assert calls and datamodule.features("train").shape[0] == 64
    assert "features go to a temporary folder" in caplog.text and str(cache_dir) in caplog.text


def test_cache_cli_lists_rows_shards_and_state_and_clears(tiny, capsys):
    from finetune.data.cache_cli import main as cache_main

    first = prepared(tiny(*SHARDED), [])
    cache_dir = str(first.cache.root)
    train = first.cache.entry(first.report["cache_keys"]["train"])
    train.drop_shard(2)  # as a killed build leaves it: shards 0, 1 and 3 written
    assert cache_main(["list", "--cache-dir", cache_dir]) == 0
    listing = capsys.readouterr().out
    assert "3 entries" in listing and "test_efficientnet" in listing and "KiB" in listing
    train_line = next(line for line in listing.splitlines() if line.startswith(train.key))
    assert "64 rows x 256  float32  4 shards  partial: 48 of 64 rows, 3 of 4 shards" in train_line
    assert sum("complete" in line for line in listing.splitlines()) == 2
    assert cache_main(["clear", "--cache-dir", cache_dir]) == 0
    assert "freed" in capsys.readouterr().out and FeatureCache(cache_dir).entries() == []


# -- whatever decides the stored numbers changes the key, or is caught on the hit --------------------------------
def test_a_constructor_argument_that_changes_the_forward_but_no_weight_misses(tiny):
    prepared(tiny("strategy=cached"), [])
    calls: list[int] = []
    changed = prepared(tiny("strategy=cached", "+backbone.global_pool=max"), calls)
    assert changed.report["cache_hit"] is False and sum(calls) > 3 * PROBE_SAMPLES


def test_another_extraction_mode_misses(tiny, monkeypatch):
    from finetune.data.features import identity as cached

    first = prepared(tiny("strategy=cached"), [])
    # what a GPU run does (bf16 autocast), here on the CPU: the same weights, other numbers
    monkeypatch.setattr(cached, "extraction_mode",
                        lambda device, precision=None: {"device": device.type, "autocast": "bfloat16",
                                                        "channels_last": False})
    changed = prepared(tiny("strategy=cached"), [])
    assert changed.report["cache_hit"] is False
    assert changed.report["cache_keys"]["train"] != first.report["cache_keys"]["train"]
    assert not torch.equal(changed.features("train"), first.features("train"))


def test_extraction_follows_the_runs_precision(tiny, monkeypatch):
    """cached extracted under bf16 autocast on a GPU even with trainer.precision=32-true, while eval and predict ran
    the backbone in fp32: extraction now runs in the run's precision (here on the CPU, where
    trainer.precision=bf16-mixed autocasts too), and the key says which."""
    from finetune.data.features import identity as cached

    monkeypatch.setattr(cached, "auto_precision", lambda accelerator="auto": "bf16-mixed")  # what a GPU would pick
    _, _, full = fit(tiny("strategy=cached", "trainer.max_epochs=1", "trainer.precision=32-true"))
    _, _, half = fit(tiny("strategy=cached", "trainer.max_epochs=1", "trainer.precision=bf16-mixed"))
    cpu = torch.device("cpu")
    assert full.identity(cpu)["extraction"]["autocast"] is None, "32-true: fp32, whatever auto would pick"
    assert half.identity(cpu)["extraction"]["autocast"] == "bfloat16"
    assert half.report["cache_hit"] is False and half.report["cache_keys"]["train"] != full.report["cache_keys"]["train"]


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
    torch.testing.assert_close(datamodule.features("train"), 2 * first.features("train"))


def test_clear_removes_only_cache_entries(tiny, tmp_path):
    from finetune.data.cache_cli import main as cache_main

    first = prepared(tiny("strategy=cached"), [])
    root = first.cache.root
    keep = {"metrics.json": '{"test_acc": 0.9}', "param_audit.json": "{}", "last.ckpt": "weights",
            "notes.pt": "not ours", "0123.json": '{"key": "0123"}', ".notes.tmp": "not ours either"}
    for name, text in keep.items():
        (root / name).write_text(text)
    assert cache_main(["clear", "--cache-dir", str(root)]) == 0
    assert sorted(p.name for p in root.iterdir()) == sorted(keep), "only the three entries and their locks went"


# -- at scale: shards, resume, damage, full disks ---------------------------------------------------------------
def kill_after_shards(cfg, shards: int) -> None:
    """Run in a child process: build the cache and SIGKILL this process right after `shards` shards are written."""
    import os
    import signal

    original, written = shard_store.Entry.write_shard, []

    def write_then_maybe_die(self, shard, arrays):
        original(self, shard, arrays)
        written.append(shard)
        if len(written) == shards:
            os.kill(os.getpid(), signal.SIGKILL)

    shard_store.Entry.write_shard = write_then_maybe_die
    prepared(cfg, [])


def test_a_killed_extraction_resumes_from_its_complete_shards_and_trains_to_the_same_head(tiny, tmp_path, caplog):
    import multiprocessing

    killed = tiny(*SHARDED, f"paths.cache_dir={tmp_path / 'killed'}")
    child = multiprocessing.get_context("spawn").Process(target=kill_after_shards, args=(killed, 2))
    child.start()
    child.join(timeout=300)
    assert child.exitcode == -9, "the child was killed mid-extraction"
    train_key = next(e.key for e in FeatureCache(tmp_path / "killed").entries() if e.manifest["identity"]["split"] == "train")
    entry = FeatureCache(tmp_path / "killed").entry(train_key)
    assert not entry.complete and entry.valid_shards() == [0, 1], "the two complete shards survived the kill"

    caplog.set_level(logging.INFO)
    _, resumed, datamodule = fit(killed)
    assert datamodule.report["rows_extracted"] == 32 + 16 + 16, "train's last 2 shards, then val and test"
    assert "resuming extraction of train features at row 32 of 64: 32 rows in 2 complete shards kept" in caplog.text
    assert FeatureCache(tmp_path / "killed").entry(train_key).complete

    _, uninterrupted, reference = fit(tiny(*SHARDED, f"paths.cache_dir={tmp_path / 'whole'}"))
    assert reference.report["rows_extracted"] == 96
    for split in ("train", "val", "test"):
        assert torch.equal(datamodule.features(split), reference.features(split))
    head, want = snapshot(resumed.head), snapshot(uninterrupted.head)
    assert all(torch.equal(head[name], want[name]) for name in want), "the same head weights as an uninterrupted run"


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_a_damaged_or_missing_shard_is_rebuilt_alone(tiny, caplog, damage):
    first = prepared(tiny(*SHARDED), [])
    entry = first.cache.entry(first.report["cache_keys"]["train"])
    want = first.features("train")
    del first  # its maps: reading a mapped page past a truncated end is SIGBUS, as with any memory map
    shard_file = entry.folder / "shard-00001.features.npy"
    if damage == "truncate":
        shard_file.write_bytes(shard_file.read_bytes()[:200])
    else:
        (entry.folder / "shard-00001.labels.npy").unlink()  # the manifest still names it
    calls: list[int] = []
    again = prepared(tiny(*SHARDED), calls)
    assert again.report["rows_extracted"] == 16, "only shard 1's rows are extracted again"
    assert "shard 1 (rows 16-32) is damaged" in caplog.text
    assert torch.equal(again.features("train"), want)
    assert entry.__class__(entry.folder, entry.key).complete


def test_a_hit_reads_manifests_and_maps_shards_without_hashing_them(tiny, monkeypatch):
    prepared(tiny(*SHARDED), [])
    monkeypatch.setattr(shard_checks, "file_sha256", lambda path: pytest.fail(f"a hit hashed all of {path}"))
    monkeypatch.setattr(shard_writing, "write_npy", lambda *a: pytest.fail("a hit wrote a shard"))
    assert prepared(tiny(*SHARDED), []).report["cache_hit"] is True


def test_a_full_disk_mid_extraction_is_one_line_and_the_next_run_resumes(tiny, monkeypatch, caplog):
    real_write, calls = shard_writing.write_npy, []

    def fills_the_disk(handle, array):
        calls.append(1)
        if len(calls) > 6:  # two shards (3 files each) fit
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(handle, array)

    monkeypatch.setattr(shard_writing, "write_npy", fills_the_disk)
    cfg = tiny(*SHARDED)
    with pytest.raises(StoreWriteError) as failure:
        prepared(cfg, [])
    message = str(failure.value)
    assert "\n" not in message and "no space left on the device" in message and str(cfg.paths.cache_dir) in message
    assert "run again to resume" in message and "KiB in all" in message
    monkeypatch.setattr(shard_writing, "write_npy", real_write)
    caplog.set_level(logging.INFO)
    resumed = prepared(cfg, [])
    assert resumed.report["rows_extracted"] == 32 + 16 + 16 and "resuming extraction of train" in caplog.text
    entry = resumed.cache.entry(resumed.report["cache_keys"]["train"])
    assert not list(entry.folder.glob(".*.tmp")), "the failed write left no temporary file"


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_reduced_precision_entries_are_half_the_size_and_train(tiny, dtype):
    full = prepared(tiny(*SHARDED), [])
    _, module, half = fit(tiny(*SHARDED, f"strategy.feature_dtype={dtype}"))
    features = half.features("train")
    assert features.dtype == getattr(torch, dtype)
    torch.testing.assert_close(features.float(), full.features("train"), rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(features, full.features("train").to(getattr(torch, dtype)), rtol=0, atol=0)
    sizes = [sum(p.stat().st_size for p in d.cache.entry(d.report["cache_keys"]["train"]).folder.glob("*.features.npy"))
             for d in (full, half)]
    assert sizes[1] < 0.55 * sizes[0]
    assert module.head[-1].weight.isfinite().all()


def test_verify_finds_a_flipped_byte_and_drop_damaged_makes_the_next_run_rebuild_that_shard(tiny, capsys):
    from finetune.data.cache_cli import main as cache_main

    first = prepared(tiny(*SHARDED), [])
    entry = first.cache.entry(first.report["cache_keys"]["train"])
    path = entry.folder / "shard-00002.features.npy"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # inside the shard: the cheap check on open cannot see it
    path.write_bytes(bytes(data))
    root = str(first.cache.root)
    assert cache_main(["verify", entry.key, "--cache-dir", root]) == 1
    out = capsys.readouterr().out
    assert "DAMAGED" in out and "shard 2 (rows 32-47): shard-00002.features.npy does not match its sha256" in out
    assert cache_main(["verify", "--drop-damaged", "--cache-dir", root]) == 1
    assert prepared(tiny(*SHARDED), []).report["rows_extracted"] == 16
    assert cache_main(["verify", "--cache-dir", root]) == 0
    assert "all whole" in capsys.readouterr().out
    assert cache_main(["verify", "0" * 24, "--cache-dir", root]) == 2


def test_extraction_progress_without_a_terminal_is_a_log_line_every_tenth(tiny, caplog):
    caplog.set_level(logging.INFO, logger="finetune.run.progress")
    prepared(tiny(*SHARDED, "strategy.extract_batch_size=4"), [])
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("extracting train features")]
    assert [line.split(":")[1].split("%")[0].strip() for line in lines] == [str(p) for p in range(10, 101, 10)]
    assert "of 64 rows" in lines[-1] and "rows/s" in lines[-1] and "ETA" in lines[-1]


def test_an_entry_of_the_old_single_file_format_is_extracted_again_and_said_so(tiny, caplog):
    cfg = tiny("strategy=cached")
    old = FeatureCache(cfg.paths.cache_dir)
    old.root.mkdir(parents=True)
    key = "ab" * 12
    (old.root / f"{key}.pt").write_bytes(b"old tensors")
    (old.root / f"{key}.json").write_text(json.dumps({"key": key, "tensors": {}}))
    caplog.set_level(logging.INFO)
    assert prepared(cfg, []).report["rows_extracted"] == 96
    assert "1 entries of the old single-file format" in caplog.text
    assert old.clear() > 0 and not (old.root / f"{key}.pt").exists()


def test_the_code_digest_covers_the_preprocessing_module(tiny, tmp_path, monkeypatch):
    from pathlib import Path

    from finetune.data import preprocessing
    from finetune.data.features import identity as cached

    images = build(tiny("strategy=cached"))[0].images
    before = cached.code_versions(images)["source"]
    edited = tmp_path / "preprocessing.py"  # where the eval geometry and normalisation live
    edited.write_text(Path(preprocessing.__file__).read_text() + "\n# an edit\n")
    monkeypatch.setattr(preprocessing, "__file__", str(edited))
    assert cached.code_versions(images)["source"] != before



def test_cached_trains_from_a_source_checkout_that_was_never_installed(tiny, monkeypatch):
    """PYTHONPATH=src without `pip install` has no package metadata (seen on a GPU machine without pip access): the
    cache key says "source" for the version, and the source digest still tells code changes apart."""
    import importlib.metadata

    from finetune.run.identity import package_version

    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", not_installed)
    assert package_version() == "source"
    cfg = tiny("strategy=cached", "trainer.max_epochs=1")
    trainer, module, datamodule = fit(cfg)
    assert datamodule.identity(torch.device("cpu"))["code"]["finetune"] == "source"


LEFT_WRITING = """
import os, signal, sys
from pathlib import Path
from finetune.data.storage.shard_store import write_atomically

def write(handle):
    handle.write(b"half a shard" * 1000)
    handle.flush()
    if sys.argv[2] == "killed":
        os.kill(os.getpid(), signal.SIGKILL)
    print("writing", flush=True)
    sys.stdin.read()  # a live writer: still writing until the test closes its stdin or kills it

write_atomically(Path(sys.argv[1]), write)
"""


def test_the_next_open_removes_temporaries_a_killed_writer_left_and_keeps_a_live_writers(tiny):
    import os
    import subprocess
    import sys
    import time

    datamodule = prepared(tiny(*SHARDED), [])
    entry = datamodule.cache.entry(datamodule.report["cache_keys"]["train"])
    del datamodule
    target = str(entry.folder / "shard-00009.features.npy")  # a name no real shard has: the writers never finish
    killed = subprocess.run([sys.executable, "-c", LEFT_WRITING, target, "killed"], capture_output=True)
    assert killed.returncode == -9, killed.stderr.decode()[-2000:]
    live = subprocess.Popen([sys.executable, "-c", LEFT_WRITING, target, "live"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE)
    try:
        assert live.stdout.readline() == b"writing\n"
        left = {p.name for p in entry.folder.glob(".*.tmp")}
        assert len(left) == 2, left
        live_tmp = next(name for name in left if f"-{live.pid}." in name)
        foreign = [entry.folder / ".shard-00009.labels.npy.otherhost-1.abcdefgh.tmp",
                   entry.folder / ".shard-00009.indices.npy.otherhost-2.abcdefgh.tmp"]
        for path in foreign:
            path.write_bytes(b"x")
        os.utime(foreign[0], (time.time() - 7200, time.time() - 7200))  # another host's, untouched for two hours

        assert prepared(tiny(*SHARDED), []).report["cache_hit"] is True
        assert {p.name for p in entry.folder.glob(".*.tmp")} == {live_tmp, foreign[1].name}, \
            "the killed writer's and the stale foreign temporaries went; the live writer's and a fresh one stayed"
    finally:
        live.kill()
        live.wait()
    prepared(tiny(*SHARDED), [])
    assert {p.name for p in entry.folder.glob(".*.tmp")} == {foreign[1].name}, "once its writer is gone, it goes"


def drop_train_shard_before_finish(monkeypatch, times: int) -> None:
    """Another process drops train's shard 1 (as one that found it damaged would) just before finish(), `times`."""
    real_finish, dropped = shard_store.Entry.finish, []

    def finish_after_a_drop(self):
        if len(dropped) < times and self.manifest["identity"]["split"] == "train" and not self.complete:
            dropped.append(1)
            self.drop_shard(1)
        return real_finish(self)

    monkeypatch.setattr(shard_store.Entry, "finish", finish_after_a_drop)


def test_a_shard_dropped_before_the_entry_is_finished_is_built_again(tiny, monkeypatch, caplog):
    drop_train_shard_before_finish(monkeypatch, times=1)
    caplog.set_level(logging.WARNING)
    datamodule = prepared(tiny(*SHARDED), [])
    assert datamodule.report["rows_extracted"] == 64 + 16 + 16 + 16, "shard 1's 16 rows twice"
    assert "lacks shards [1] after its build" in caplog.text
    assert datamodule.cache.entry(datamodule.report["cache_keys"]["train"]).complete
    assert len(datamodule.features("train")) == 64


def test_shards_that_keep_vanishing_fail_in_one_line(tiny, monkeypatch):
    drop_train_shard_before_finish(monkeypatch, times=2)
    with pytest.raises(StoreWriteError) as failure:
        prepared(tiny(*SHARDED), [])
    message = str(failure.value)
    assert "\n" not in message and "still lacks shards [1]" in message and "another process" in message
