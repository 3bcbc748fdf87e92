"""The cache folder at scale: a hit that does not stat every file, entries of two kinds listed and cleared apart, and
head epochs over an entry larger than the job's memory that read it about once."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from finetune.build import build
from finetune.data.base import IndexBatchLoader, IndexBatchSampler
from finetune.data.cache_cli import main as cache_main
from finetune.data.features.cached import MappedRows
from finetune.data.storage.epoch_order import WindowedIndexBatchSampler, cgroup_memory_limit, choose_window
from finetune.data.features.cache import FeatureCache
from finetune.data.sources.file_listing import SAMPLED_FILES, sampled_positions
from finetune.data.storage import shard_store
from finetune.data.storage.shard_store import Column, MappedEntry, Store
from finetune.data.storage.window_reader import WindowReader
from finetune.errors import ConfigError
from tests.conftest import compose_config, fit, make_image_folder
from tests.data.test_image_store import image_run


def store_datamodule(tmp_path: Path, root: Path):
    datamodule, _ = build(compose_config(tmp_path, image_run(root, "data.store=true")))
    datamodule.prepare_data()
    return datamodule


# -- a hit costs a bounded number of stats; identities per split; verify checks every file ---------------------
def image_stats_on_a_hit(tmp_path: Path, per_class: int, monkeypatch) -> int:
    """os.stat calls on image files (unit: calls) while a second datamodule opens its store and asks its identity
    as often as a run does (cache key, predictions)."""
    root = make_image_folder(tmp_path / f"images{per_class}", per_class=per_class)
    store_datamodule(tmp_path, root)
    calls, real_stat = [], os.stat

    def counting_stat(path, *args, **kwargs):
        if str(path).endswith(".png"):
            calls.append(str(path))
        return real_stat(path, *args, **kwargs)

    monkeypatch.setattr(os, "stat", counting_stat)
    again = store_datamodule(tmp_path, root)
    for _ in range(3):
        again.dataset_id  # noqa: B018 - what the feature cache key and write_predictions ask
    monkeypatch.setattr(os, "stat", real_stat)
    assert again.store.report["store_hit"] and again.store.report["images_decoded"] == 0
    return len(calls)


def test_a_store_hit_stats_a_bounded_number_of_files_whatever_the_folders_size(tmp_path, monkeypatch):
    small = image_stats_on_a_hit(tmp_path, 20, monkeypatch)  # 80 files
    large = image_stats_on_a_hit(tmp_path, 80, monkeypatch)  # 320 files
    assert max(small, large) <= 3 * SAMPLED_FILES, (small, large)  # 16 a split (the held-out test split of 80 has 4)


def test_a_changed_val_file_rebuilds_the_val_store_and_leaves_the_train_store_in_place(tmp_path):
    root = make_image_folder(tmp_path / "images", per_class=6)
    first = store_datamodule(tmp_path, root)
    keys = {split: entry.key for split, entry in first.store.entries.items()}
    Image.new("RGB", (20, 20), (255, 0, 0)).save(root / "val" / "cat" / "2.png")
    again = store_datamodule(tmp_path, root)
    assert again.store.report["images_decoded"] == len(first.split_dataset("val")) == 12
    assert again.store.entries["train"].key == keys["train"] and again.store.entries["test"].key == keys["test"]
    assert again.store.entries["val"].key != keys["val"]


def test_verify_finds_a_changed_file_that_the_hit_did_not_sample_and_drop_damaged_rebuilds_it(tmp_path, capsys):
    root = make_image_folder(tmp_path / "images", per_class=30)  # val: 60 files, 16 sampled on a hit
    first = store_datamodule(tmp_path, root)
    cache_dir = str(first.store.cache.root)
    assert cache_main(["verify", "--cache-dir", cache_dir]) == 0
    assert "60 files unchanged" in capsys.readouterr().out  # val's
    val = first.split_dataset("val").samples
    unsampled = next(path for position, (path, _) in enumerate(val) if position not in sampled_positions(len(val)))
    Image.new("RGB", (20, 20), (255, 0, 0)).save(unsampled)
    os.utime(unsampled, ns=(1, 1))  # a different modification time even within the filesystem's granularity
    assert store_datamodule(tmp_path, root).store.report["images_decoded"] == 0, "the hit samples, by design"
    assert cache_main(["verify", "--cache-dir", cache_dir]) == 1
    out = capsys.readouterr().out
    assert "STALE" in out and f"1 of 60 files changed since it was built; first: {unsampled}" in out
    assert cache_main(["verify", "--drop-damaged", "--cache-dir", cache_dir]) == 1
    rebuilt = store_datamodule(tmp_path, root)
    assert rebuilt.store.report["images_decoded"] == 60, "only the stale val entry is built again"
    assert cache_main(["verify", "--cache-dir", cache_dir]) == 0


# -- two kinds of entries in one folder ---------------------------------------------------------------------------
def two_kinds(tmp_path: Path, tiny) -> str:
    """A folder with the image store's entries (3 splits) and strategy=cached's features (3 splits)."""
    cache_dir = tmp_path / "cache"
    store_datamodule(tmp_path, make_image_folder(tmp_path / "images"))
    features, _ = build(tiny("strategy=cached", f"paths.cache_dir={cache_dir}"))
    features.setup("fit")
    return str(cache_dir)


def test_list_shows_each_entrys_kind_and_lists_one_kind(tmp_path, tiny, capsys):
    cache_dir = two_kinds(tmp_path, tiny)
    assert cache_main(["list", "--cache-dir", cache_dir]) == 0
    lines = capsys.readouterr().out.splitlines()
    images = [line for line in lines if "  images  " in line]
    features = [line for line in lines if "  features  " in line]
    assert len(images) == len(features) == 3 and lines[-1].startswith("6 entries (3 features, 3 images)")
    assert all("store_size=" in line and "image_folder" in line and "?" not in line for line in images)
    assert all("test_efficientnet" in line for line in features)
    assert cache_main(["list", "--kind", "images", "--cache-dir", cache_dir]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4 and all("  images  " in line for line in lines[:3]) and "3 entries (3 images)" in lines[-1]


def test_clear_one_kind_leaves_the_other(tmp_path, tiny, capsys):
    cache_dir = two_kinds(tmp_path, tiny)
    cache = FeatureCache(cache_dir)
    features = {e.key for e in cache.entries_of("features")}
    assert cache_main(["clear", "--kind", "images", "--cache-dir", cache_dir]) == 0
    assert "cleared the images entries of" in capsys.readouterr().out
    assert {e.key for e in cache.entries()} == features
    assert sorted(p.name for p in Path(cache_dir).glob("*.lock")) == sorted(f"{k}.lock" for k in features)
    assert cache_main(["clear", "--kind", "features", "--cache-dir", cache_dir]) == 0
    assert cache.entries() == []


def test_a_bad_kind_is_one_line_naming_the_kinds_and_exit_2(tmp_path, capsys):
    for action in ("list", "clear"):
        assert cache_main([action, "--kind", "pictures", "--cache-dir", str(tmp_path)]) == 2
        err = capsys.readouterr().err.strip()
        assert err == "error: --kind: unknown kind 'pictures'; choose one of: features, images"


# -- head epochs over an entry larger than memory ----------------------------------------------------------------
WINDOW = {"block_rows": 25, "window_blocks": 4}  # 100 rows a window


def windowed(length: int, epoch: int = 0, seed: int = 7, world: int = 1, rank: int = 0, batch_size: int = 16):
    sampler = WindowedIndexBatchSampler(length, batch_size, True, world, rank, seed, **WINDOW)
    sampler.set_epoch(epoch)
    return sampler


def test_the_windowed_order_is_every_row_once_a_function_of_seed_and_epoch():
    for length in (1000, 1013, 7):
        orders = [windowed(length, epoch).epoch_order() for epoch in (0, 1)]
        assert all(torch.equal(order.sort().values, torch.arange(length)) for order in orders)
    assert torch.equal(windowed(1000, 3).epoch_order(), windowed(1000, 3).epoch_order())
    assert not torch.equal(windowed(1000, 0).epoch_order(), windowed(1000, 1).epoch_order())
    assert not torch.equal(windowed(1000, 0, seed=1).epoch_order(), windowed(1000, 0, seed=2).epoch_order())


def test_the_windowed_order_shards_ranks_without_overlap():
    """3 ranks: every row on exactly one rank, but for the padding (1000 = 3 x 334 - 2) that DistributedSampler's
    rule takes from the start of the order; each rank's batches are the same length."""
    per_rank = [windowed(1000, 2, world=3, rank=rank).indices() for rank in range(3)]
    assert [len(r) for r in per_rank] == [334, 334, 334]
    everything = torch.cat(per_rank)
    order = windowed(1000, 2).epoch_order()
    assert torch.equal(everything.sort().values, torch.cat([order, order[:2]]).sort().values)
    assert torch.equal(per_rank[1], torch.cat([order, order[:2]])[1::3])


def test_a_resumed_windowed_epoch_steps_exactly_the_batches_an_uninterrupted_one_has_left():
    rows = torch.arange(1000)

    def batches(done: int) -> list[torch.Tensor]:
        trainer = SimpleNamespace(fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(
            batch_progress=SimpleNamespace(current=SimpleNamespace(ready=done)))))
        loader = IndexBatchLoader(Rows(rows), windowed(1000, 5), trainer)
        return list(loader)

    whole, resumed = batches(0), batches(23)
    assert len(resumed) == len(whole) - 23 and all(torch.equal(a, b) for a, b in zip(whole[23:], resumed))


class Rows:
    device = torch.device("cpu")

    def __init__(self, rows: torch.Tensor):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: torch.Tensor) -> torch.Tensor:
        return self.rows[index]


def mapped_entry(folder: Path, rows: int = 1000, rows_per_shard: int = 100):
    entry = Store(folder).entry("0" * 24)
    columns = {"features": Column("float32", (8,)), "labels": Column("int64", ())}
    entry.create({}, rows, rows_per_shard, columns)
    for shard in range(entry.num_shards):
        start, stop = entry.shard_range(shard)
        entry.write_shard(shard, {"features": np.zeros((stop - start, 8), np.float32),
                                  "labels": np.arange(start, stop, dtype=np.int64)})
    assert entry.finish()
    return entry.open()


def block_reads(loader, block_rows: int) -> tuple[torch.Tensor, list[set[int]]]:
    """Rows read per block over an epoch (unit: rows), and the blocks each batch reads."""
    reads, per_batch = torch.zeros(1000 // block_rows, dtype=torch.long), []
    for _, labels in loader:  # the labels column holds the row number
        blocks = labels // block_rows
        reads += torch.bincount(blocks, minlength=len(reads))
        per_batch.append(set(blocks.tolist()))
    return reads, per_batch


def live_span(per_batch: list[set[int]], block: int) -> int:
    """Batches from the first to the last that read `block`."""
    touched = [i for i, blocks in enumerate(per_batch) if block in blocks]
    return touched[-1] - touched[0] + 1


def test_a_windowed_epoch_reads_each_block_once_within_one_window(tmp_path):
    """Each 25-row block of a 1,000-row entry (10 shards of 100 rows) is read once (25 row reads) and only while its
    window of 100 rows is served: at most 100 / 20 + 1 batches from its first read to its last, no batch reading
    more than two windows' blocks; a full shuffle reads every block over nearly the whole epoch."""
    rows = MappedRows(mapped_entry(tmp_path))
    reads, per_batch = block_reads(IndexBatchLoader(rows, windowed(1000, 1, batch_size=20)), WINDOW["block_rows"])
    assert reads.tolist() == [25] * 40
    assert max(live_span(per_batch, block) for block in range(40)) <= 100 // 20 + 1
    assert max(len(blocks) for blocks in per_batch) <= 2 * WINDOW["window_blocks"]
    shuffled = IndexBatchLoader(rows, IndexBatchSampler(1000, 20, True, True, seed=7))
    _, per_batch = block_reads(shuffled, WINDOW["block_rows"])
    assert min(live_span(per_batch, block) for block in range(40)) > 30


def test_auto_shuffles_an_entry_that_fits_and_windows_one_that_does_not():
    gib = 2**30
    assert choose_window("auto", 1 * gib, 200_000, None, headroom_bytes=8 * gib) is None
    block_rows, blocks = choose_window("auto", 10 * gib, 2_000_000, None, headroom_bytes=8 * gib)
    row_bytes = 10 * gib // 2_000_000
    assert block_rows * row_bytes <= 4 * 2**20 and 3 * gib < blocks * block_rows * row_bytes <= 4 * gib
    # the ranks of a node each hold a window in RAM: they share the headroom
    assert choose_window("auto", 10 * gib, 2_000_000, None, headroom_bytes=8 * gib, processes=4)[1] == blocks // 4
    block_rows, blocks = choose_window("window", 1 * gib, 200_000, 256 * 2**20, headroom_bytes=8 * gib)
    assert 128 * 2**20 < blocks * block_rows * (gib // 200_000) <= 256 * 2**20
    assert choose_window("shuffle", 10 * gib, 2_000_000, None, headroom_bytes=gib) is None
    with pytest.raises(ConfigError, match="choose one of: auto, shuffle, window"):
        choose_window("random", gib, 10, None)


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_the_jobs_memory_limit_is_read_from_its_cgroup_and_its_ancestors(tmp_path, version):
    proc = tmp_path / "cgroup"
    if version == "v2":
        proc.write_text("0::/job/step\n")
        base, name = tmp_path / "fs", "memory.max"
    else:
        proc.write_text("12:cpu,cpuacct:/other\n4:memory:/job/step\n")
        base, name = tmp_path / "fs" / "memory", "memory.limit_in_bytes"
    (base / "job" / "step").mkdir(parents=True)
    (base / "job" / name).write_text("1500000000\n")
    (base / "job" / "step" / name).write_text("max\n" if version == "v2" else "9223372036854771712\n")
    assert cgroup_memory_limit(str(proc), str(tmp_path / "fs")) == 1_500_000_000
    (base / "job" / name).write_text("max\n" if version == "v2" else "9223372036854771712\n")
    assert cgroup_memory_limit(str(proc), str(tmp_path / "fs")) is None


def test_strategy_cached_trains_in_the_windowed_order_and_refuses_an_unknown_one(tiny, caplog):
    caplog.set_level("INFO")
    trainer, _, datamodule = fit(tiny("strategy=cached", "strategy.epoch_order=window", "strategy.window_bytes=4096",
                                      "trainer.max_epochs=1"))
    assert trainer.global_step > 0 and "in a windowed order" in caplog.text
    loader = datamodule.train_dataloader()
    assert isinstance(loader.sampler, WindowedIndexBatchSampler)
    assert loader.dataset.window_reader.sampler is loader.sampler  # its windows are read into RAM, not faulted in
    with pytest.raises(ConfigError, match="strategy.epoch_order='random'; choose one of: auto, shuffle, window"):
        build(tiny("strategy=cached", "strategy.epoch_order=random"))


# -- a windowed epoch read into RAM a window at a time -------------------------------------------------------------
def random_entry(folder: Path, rows: int = 1013, rows_per_shard: int = 97):
    """Random features (so equal rows prove equal bytes) in shards whose edges fall inside the 25-row blocks."""
    entry = Store(folder).entry("1" * 24)
    entry.create({}, rows, rows_per_shard, {"features": Column("float32", (8,)), "labels": Column("int64", ())})
    generator = np.random.default_rng(0)
    for shard in range(entry.num_shards):
        start, stop = entry.shard_range(shard)
        entry.write_shard(shard, {"features": generator.standard_normal((stop - start, 8), dtype=np.float32),
                                  "labels": generator.integers(0, 10, stop - start)})
    assert entry.finish()
    return entry.open()


def recorded_reads(monkeypatch) -> list:
    """Every file read of the window reader, (path, offset, bytes, page cache dropped), and 'window k' markers."""
    events, real_read, real_load = [], shard_store.read_file_range, WindowReader._load

    def read(path, offset, into, drop_page_cache=False):
        events.append((path.name, offset, len(into), drop_page_cache))
        real_read(path, offset, into, drop_page_cache)

    def load(self, window):
        events.append(f"window {window}")
        real_load(self, window)

    monkeypatch.setattr(shard_store, "read_file_range", read)
    monkeypatch.setattr(WindowReader, "_load", load)
    return events


def test_a_window_is_read_once_with_plain_reads_of_exactly_its_blocks(tmp_path, monkeypatch):
    """1,013 rows (40 blocks of 25 and one of 13; 97-row shards), 4 blocks a window: each window's reads (unit:
    bytes) are its blocks' bytes of both columns, each window is read once and in turn, every byte of every file once
    over the epoch, none through the map; one process drops the pages it read from the page cache."""
    entry = random_entry(tmp_path)
    events = recorded_reads(monkeypatch)
    monkeypatch.setattr(MappedEntry, "gather", lambda *a, **k: pytest.fail("a row was gathered from the map"))
    sampler = windowed(1013, 4, batch_size=20)
    for _ in IndexBatchLoader(MappedRows(entry).read_by_window(sampler), sampler):
        pass
    windows = sampler.windows()
    assert [e for e in events if isinstance(e, str)] == [f"window {k}" for k in range(len(windows))]
    per_window, row_bytes = [], 8 * 4 + 8
    for event in events:
        if isinstance(event, str):
            per_window.append(0)
        else:
            per_window[-1] += event[2]
    assert per_window == [sum(min(25, 1013 - 25 * int(b)) for b in blocks) * row_bytes for blocks in windows]
    for name in {e[0] for e in events if not isinstance(e, str)}:
        ranges = sorted((e[1], e[1] + e[2]) for e in events if not isinstance(e, str) and e[0] == name)
        assert all(stop == start for (_, stop), (start, _) in zip(ranges, ranges[1:]))  # no byte twice, no gap
        assert ranges[-1][1] == (tmp_path / ("1" * 24) / name).stat().st_size
    assert all(e[3] for e in events if not isinstance(e, str))


@pytest.mark.parametrize("world", [1, 3])
def test_the_window_reader_serves_the_mapped_rows_of_every_batch_bitwise(tmp_path, world):
    """Every batch of every rank (3 ranks: padding rows from the first window, served from the map at the end),
    over two epochs, equals the rows gathered from the map for the same indices, bit for bit."""
    entry = random_entry(tmp_path)
    for rank in range(world):
        sampler = windowed(1013, 0, world=world, rank=rank, batch_size=20)
        rows, mapped = MappedRows(entry).read_by_window(sampler), MappedRows(entry)
        for epoch in (0, 1):
            sampler.set_epoch(epoch)
            for index in sampler.batches():
                for served, expected in zip(rows[index], mapped[index]):
                    assert served.dtype == expected.dtype
                    assert torch.equal(served.view(torch.uint8), expected.view(torch.uint8))
        assert rows.window_reader.drop_page_cache == (world == 1)  # ranks of a node share the page cache


def test_a_resumed_epoch_read_by_window_serves_the_batches_left_and_reads_from_the_window_it_resumes_in(
        tmp_path, monkeypatch):
    entry = random_entry(tmp_path)

    def batches(done: int):
        trainer = SimpleNamespace(fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(
            batch_progress=SimpleNamespace(current=SimpleNamespace(ready=done)))))
        sampler = windowed(1013, 5, batch_size=20)
        return list(IndexBatchLoader(MappedRows(entry).read_by_window(sampler), sampler, trainer))

    whole = batches(0)
    events = recorded_reads(monkeypatch)
    resumed = batches(23)  # row 460 on: the fifth window of this seed's epoch
    assert len(resumed) == len(whole) - 23
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(whole[23:], resumed))
    assert [e for e in events if isinstance(e, str)][0] == "window 4"
