"""The benchmark's plumbing at tiny sizes on the CPU: every runner runs and the summary is complete.
No timing is asserted: speed targets are read off the benchmark's table, never tested."""

from __future__ import annotations

import json

from finetune.bench.training import bench_strategy_names, benchmark, format_table, parse_args

TINY_BENCH = ["--device", "cpu", "--models", "test_efficientnet", "--image-size", "32", "--batch-size", "4",
              "--cached-batch-size", "16", "--num-classes", "5", "--warmup", "1", "--steps", "2", "--repeats", "2"]


# one of each kind: images, stored features, a staged strategy in its last phase, injected adapters (the README's
# bench command runs every strategy once)
KINDS = ["full", "cached", "lp_ft@finetune", "lora"]


def test_the_benchmark_covers_every_strategy_config_by_default():
    # every strategy config, none listed by hand; a staged one in its last phase (gradual@all, lp_ft@finetune)
    assert parse_args([]).strategies == bench_strategy_names()
    assert {"full", "cached", "gradual@all", *KINDS} <= set(bench_strategy_names())


def test_benchmark_measures_template_raw_and_naive_for_each_kind_of_strategy(tmp_path):
    out = tmp_path / "bench.json"
    rows = benchmark([*TINY_BENCH, "--strategies", *KINDS, "--cache-dir", str(tmp_path / "cache"), "--out", str(out)])
    assert [r["strategy"] for r in rows] == KINDS
    for row in rows:
        assert row["template_samples_per_second"] > 0 and row["raw_samples_per_second"] > 0
        template, raw = row["template_samples_per_second"], row["raw_samples_per_second"]
        ratio = template / raw
        # the rates are rounded to 0.1 and the ratio to 0.001: equal within what that rounding allows (a loaded
        # machine can make these tiny runs slow enough for the rates' rounding to show)
        assert abs(row["template_over_raw"] - ratio) <= ratio * (0.05 / template + 0.05 / raw) + 5e-4, \
            "ratio of the (unrounded) medians"
        assert (row["naive_samples_per_second"] is None) == (row["strategy"] == "cached"), "naive: image inputs only"
        assert row["memory_vs_full"] is not None
        goal_met = row["template_over_raw"] >= 0.9
        assert row["meets_goal"] == goal_met or abs(row["template_over_raw"] - 0.9) <= 5e-4, "the CPU goal marks it"
    report = json.loads(out.read_text())
    runners = {(m["strategy"], m["runner"]) for m in report["measurements"]}
    assert ("full", "naive") in runners and ("cached", "raw") in runners
    assert sum(m["runner"] == "template" for m in report["measurements"]) == 2 * len(rows), "alternated, twice each"
    assert "tpl/raw" in format_table(rows)


def test_the_storage_benchmark_reads_back_what_each_library_wrote(tmp_path):
    """finetune-bench storage at a toy size, for the libraries every install has (litdata is optional)."""
    from finetune.bench import storage as bench_storage

    report = bench_storage.main(["--rows", "300", "--size", "16", "--libraries", "npy", "safetensors",
                                 "--work-dir", str(tmp_path / "work"), "--out", str(tmp_path / "storage.json")])
    assert [r["library"] for r in report["results"]] == ["npy", "safetensors"]
    assert all(r["disk_bytes"] >= 300 * 16 * 16 * 3 and r["random_first"] > 0 for r in report["results"])
    assert not (tmp_path / "work").exists()


def test_the_head_grid_benchmark_times_every_width_on_one_cache_entry(tmp_path):
    """finetune-bench head_grid end to end on the tiny model: every width timed on a cache hit, ratios to the grid
    of 1, the table and the JSON written, the scratch folder removed."""
    from finetune.bench import head_grid as bench_head_grid
    from finetune.bench.cli import main as bench_main

    out, work = tmp_path / "head_grid.json", tmp_path / "work"
    bench_main(["head_grid", "--sizes", "fake:64", "--heads", "1", "2", "--repeats", "1", "--epochs", "fake:64=2",
                "--batch-size", "16", "--overrides", "backbone=timm", "backbone.name=test_efficientnet",
                "backbone.pretrained=false", "--work-dir", str(work), "--out", str(out)])
    report = json.loads(out.read_text())
    assert [(r["size"], r["heads"], r["rows"], r["epochs"]) for r in report["rows"]] == [("fake:64", 1, 64, 2),
                                                                                         ("fake:64", 2, 64, 2)]
    assert all(r["seconds"] > 0 and r["extract_seconds"] > 0 for r in report["rows"]), "timed, after one extraction"
    assert report["rows"][0]["over_grid1"] == 1.0
    assert all(r["real_fit_seconds"] > 0 and r["over_real"] > 0 for r in report["rows"]), "one real run timed"
    assert "x real run" in bench_head_grid.format_table(report["rows"]) and not work.exists()
