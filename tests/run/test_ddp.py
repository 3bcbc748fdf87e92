"""Lightning DDP on 2 CPU processes (gloo): every strategy trains, ranks end identical, and multirun stays tidy."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch

from finetune.data.features.cache import FeatureCache
from finetune.eval import load_for_eval
from finetune.train import train
from tests.conftest import TESTS_DIR, TINY, compose_config
from tests.test_cli import run_cli, start_cli

DDP = [*TINY, "trainer=ddp_cpu", "trainer.max_epochs=3", "+callbacks.digest._target_=tests.run.faults.WriteEpochWeightDigest",
       "+callbacks.digest.output_dir=${paths.output_dir}"]


EXTENSION_CONFIGS = str(TESTS_DIR / "extension" / "configs")


SWEEPS = {  # a sweep's strategies, and how its ranks find the user's config folder
    # gradual_tiny and lp_ft_tiny (staged: 3 phases / a probe on cached features, then everything) live in the added
    # config folder only, so the relaunched ranks must find it; lora's adapters are injected on each rank
    "searchpath": ("full,no_grad,gradual_tiny,bitfit,lora", [f"hydra.searchpath=[file://{EXTENSION_CONFIGS}]"]),
    "config_dir": ("freeze,cached,lp_ft_tiny,norm", ["-cd", EXTENSION_CONFIGS]),
}


def test_every_strategy_trains_under_ddp_and_ranks_end_identical(tmp_path):
    """Both sweeps at once: while a job's second rank imports torch, a core would otherwise sit idle."""
    started = {}
    for name, (strategies, configs) in SWEEPS.items():
        (tmp_path / name).mkdir()
        started[name] = start_cli("finetune.train", "-m", *configs, f"strategy={strategies}", *DDP,
                                  f"hydra.sweep.dir={tmp_path / name / 'sweep'}",
                                  f"paths.cache_dir={tmp_path / name / 'cache'}", cwd=tmp_path / name,
                                  log=tmp_path / f"{name}.log")
    for name, process in started.items():
        assert process.wait(timeout=600) == 0, (tmp_path / f"{name}.log").read_text()[-3000:]
        check_sweep(tmp_path / name, SWEEPS[name][0].split(","))


def check_sweep(folder, jobs: list[str]) -> None:
    sweep = folder / "sweep"
    # one folder per job, no stray run folders from the relaunched rank (lightning-hydra-template's duplicates); the
    # relaunched ranks found the user's configs (-cd, hydra.searchpath) too
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == [str(job) for job in range(len(jobs))]
    assert not (folder / "logs" / "train" / "runs").exists()
    for job, strategy in enumerate(jobs):
        run = sweep / str(job)
        rank0, rank1 = ((run / f"weights_rank{r}.txt").read_text() for r in (0, 1))
        assert rank0 == rank1, f"{strategy}: ranks hold different weights after fit"
        metrics = json.loads((run / "metrics.json").read_text())
        assert metrics["strategy"] == {"lp_ft_tiny": "lp_ft"}.get(strategy, strategy)
        assert metrics["train_samples"] == 64 * 3, "throughput counts both ranks' samples"
        # after every epoch, hence after every phase of the staged ones, the ranks hold the same weights
        digests = [[(run / f"weights_rank{r}_epoch{e}.txt").read_text() for r in (0, 1)] for e in range(3)]
        assert all(rank0 == rank1 for rank0, rank1 in digests), f"{strategy}: ranks differ after an epoch"
        assert len({rank0 for rank0, _ in digests}) == 3, f"{strategy}: every epoch changed the weights"
        assert json.loads((run / "param_audit.json").read_text())["violations"] == []


def columns(cache: FeatureCache) -> dict[str, dict[str, torch.Tensor]]:
    """Every entry's columns by key, read from its shards."""
    result = {}
    for entry in cache.entries():
        assert entry.complete, f"{entry.key} is incomplete"
        mapped = entry.open()
        result[entry.key] = {name: mapped.column(name) for name in ("features", "labels", "indices")}
    return result


CACHE_REPORT = ["+callbacks.cache_report._target_=tests.run.faults.RecordCacheReport",
                "+callbacks.cache_report.output_dir=${paths.output_dir}"]
SHARD_ROWS = 8  # 70 train rows: 9 shards; 17 val and test rows: 3 each
CACHED = [*TINY, "strategy=cached", "trainer.max_epochs=1", f"strategy.shard_rows={SHARD_ROWS}",
          "data.num_samples=70"]  # 70 train / 17 val and test: unequal shares


@pytest.fixture(scope="module")
def one_process_cached(tmp_path_factory):
    """The one-process run of CACHED, in-process, once for the tests that compare the ranks' caches with its cache
    and its metrics (they only read them; a test that trains on its cache copies it first): its run folder and
    cache folder."""
    root = tmp_path_factory.mktemp("one_process_cached")
    (root / "one").mkdir()
    train(compose_config(root / "one", [*CACHED, f"paths.cache_dir={root / 'cache'}"]))
    return root / "one", root / "cache"


def test_ddp_cached_with_node_local_caches_builds_what_each_node_lacks_and_evaluates_each_sample_once(
        tmp_path, one_process_cached):
    """Two cache folders stand in for two nodes: node0 already holds the entries (from a one-process run), node1
    does not. Rank 0 hits; rank 1 cannot see node0's shards, so it builds every shard itself, one at a time."""
    import shutil

    one, cache = one_process_cached
    common = CACHED
    shutil.copytree(cache, tmp_path / "node0", ignore=shutil.ignore_patterns(".folder-token"))  # node0's own token
    ddp = run_cli("finetune.train", *common, "trainer=ddp_cpu", f"paths.cache_dir={tmp_path}/node${{oc.env:LOCAL_RANK,0}}",
                  "+callbacks.wrapping._target_=tests.run.faults.RecordDDPWrapping",
                  "+callbacks.wrapping.output_dir=${paths.output_dir}", *CACHE_REPORT,
                  f"hydra.run.dir={tmp_path / 'ddp'}", cwd=tmp_path)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    want, got = columns(FeatureCache(tmp_path / "node0")), columns(FeatureCache(tmp_path / "node1"))
    assert set(got) == set(want), "same identity, same key"
    for key, tensors in want.items():
        assert torch.equal(tensors["labels"], got[key]["labels"]) and torch.equal(tensors["indices"], got[key]["indices"])
        torch.testing.assert_close(got[key]["features"], tensors["features"], rtol=1e-4, atol=1e-5)
    reports = [json.loads((tmp_path / "ddp" / f"cache_rank{rank}.json").read_text()) for rank in (0, 1)]
    assert reports[0]["rows_extracted"] == 0 and reports[0]["cache_hit"] is True
    assert reports[1]["rows_extracted"] == 70 + 17 + 17
    assert reports[1]["extract_buffer_rows"] == SHARD_ROWS, "rank 1 never held more than one shard of features"

    metrics = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert metrics["train_samples"] == json.loads((one / "metrics.json").read_text())["train_samples"]
    # the 17 test samples are each counted once across the two ranks: the same loss as one process on that checkpoint
    module, images = load_for_eval(metrics["best_checkpoint"])
    single = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                       enable_model_summary=False).test(module, datamodule=images, verbose=False)[0]
    assert metrics["test_loss"] == pytest.approx(single["test/loss"], rel=1e-5)
    assert metrics["test_acc"] == pytest.approx(single["test/acc"], abs=1e-6)
    # predictions.csv gathers both ranks' test samples: each index once, in order, agreeing with the accuracy
    rows = (tmp_path / "ddp" / "predictions.csv").read_text().splitlines()[1:]
    assert [int(row.split(",")[0]) for row in rows] == list(range(17))
    assert sum(row.split(",")[1] == row.split(",")[2] for row in rows) / 17 == pytest.approx(metrics["test_acc"])

    for rank in (0, 1):  # channels_last (on a GPU) is applied in setup, which runs before DDP wraps the model
        assert json.loads((tmp_path / "ddp" / f"wrapping_rank{rank}.json").read_text()) == {
            "setup": False, "fit_start": True}


def test_ddp_ranks_sharing_one_cache_folder_split_the_shards_and_write_what_one_process_writes(tmp_path,
                                                                                             one_process_cached):
    _, single = one_process_cached
    ddp = run_cli("finetune.train", *CACHED, "trainer=ddp_cpu", f"paths.cache_dir={tmp_path / 'shared'}",
                  *CACHE_REPORT, f"hydra.run.dir={tmp_path / 'ddp'}", cwd=tmp_path)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    want, got = columns(FeatureCache(single)), columns(FeatureCache(tmp_path / "shared"))
    assert set(got) == set(want)
    for key, tensors in want.items():
        assert torch.equal(tensors["labels"], got[key]["labels"]) and torch.equal(tensors["indices"], got[key]["indices"])
        torch.testing.assert_close(got[key]["features"], tensors["features"], rtol=1e-4, atol=1e-5)
    reports = [json.loads((tmp_path / "ddp" / f"cache_rank{rank}.json").read_text()) for rank in (0, 1)]
    # shards go round-robin: train's 9 of 8 rows (the last 6) -> rank 0: 5 shards (38 rows), rank 1: 4 (32);
    # val's and test's 3 shards (8, 8, 1) -> rank 0: shards 0 and 2 (9 rows), rank 1: shard 1 (8)
    assert [r["rows_extracted"] for r in reports] == [38 + 9 + 9, 32 + 8 + 8], "each rank built its share only"
    assert all(r["extract_buffer_rows"] == SHARD_ROWS for r in reports), "no rank held more than one shard"


@pytest.mark.slow
def test_four_ranks_two_per_node_local_folder_extract_each_shard_once_per_folder(tmp_path):
    """Two nodes of two ranks, each node with its own empty cache folder: each folder gets every row once, split
    between its two ranks, and both folders end with the same entries."""
    ddp = run_cli("finetune.train", *TINY, "strategy=cached", "trainer.max_epochs=1", f"strategy.shard_rows={SHARD_ROWS}",
                  "data.num_samples=70", "trainer=ddp_cpu", "trainer.devices=4",
                  "strategy._target_=tests.run.faults.cached_two_ranks_per_folder", f"paths.cache_dir={tmp_path}",
                  *CACHE_REPORT, f"hydra.run.dir={tmp_path / 'ddp'}", cwd=tmp_path)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    rows = [json.loads((tmp_path / "ddp" / f"cache_rank{rank}.json").read_text())["rows_extracted"] for rank in range(4)]
    one_pass = 70 + 17 + 17
    assert rows[0] + rows[1] == rows[2] + rows[3] == one_pass, f"rows extracted per rank: {rows}"
    assert max(rows) - min(rows) <= 3 * SHARD_ROWS, f"each rank about half its folder's pass (a shard a split): {rows}"
    # train's 9 shards round-robin over 4 ranks, then each folder's 4 or 5 gaps to its less loaded rank: 38, 32, 38,
    # 32; val's and test's 3 shards (8, 8, 1 rows) the same way: 9, 8, 9, 8 each
    assert rows == [56, 48, 56, 48]
    want, got = columns(FeatureCache(tmp_path / "node0")), columns(FeatureCache(tmp_path / "node1"))
    assert set(got) == set(want) and len(want) == 3
    for key, tensors in want.items():
        assert torch.equal(tensors["indices"], got[key]["indices"]) and torch.equal(tensors["labels"], got[key]["labels"])
        torch.testing.assert_close(got[key]["features"], tensors["features"], rtol=1e-4, atol=1e-5)


def test_shards_are_dealt_so_each_folder_gets_each_missing_shard_once():
    from finetune.data.storage.shard_build import deal_shards

    # four ranks, two folders (tokens 7 and 9); folder 7 already holds shard 0
    plan = deal_shards(9, [{0}, {0}, set(), set()], [7, 7, 9, 9])
    for sharers in ((0, 1), (2, 3)):
        built = [s for rank in sharers for s in plan[rank]]
        held = {0} if sharers == (0, 1) else set()
        assert sorted(built + sorted(held)) == list(range(9)), f"ranks {sharers}: each shard once: {plan}"
        assert abs(len(plan[sharers[0]]) - len(plan[sharers[1]])) <= 1, plan
    # one shared folder: the shards nobody holds, round-robin, nothing twice
    assert deal_shards(5, [{1}, {1}], [3, 3]) == [[0, 3], [2, 4]]
    # a folder that holds everything builds nothing; a node-local one beside it builds all, split between its ranks
    plan = deal_shards(4, [{0, 1, 2, 3}, {0, 1, 2, 3}, set(), set()], [1, 1, 2, 2])
    assert plan[:2] == [[], []] and sorted(plan[2] + plan[3]) == [0, 1, 2, 3] and len(plan[2]) == 2


def test_every_process_that_sees_a_folder_reads_the_same_token_and_another_folder_another(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from finetune.data.storage.shard_build import folder_token

    with ThreadPoolExecutor(8) as pool:
        tokens = set(pool.map(lambda _: folder_token(tmp_path / "a"), range(16)))
    assert len(tokens) == 1 and folder_token(tmp_path / "b") not in tokens
    assert [p.name for p in (tmp_path / "a").iterdir()] == [".folder-token"], "no temporary left behind"


def test_the_rank_relaunch_keeps_config_flags_and_user_hydra_overrides_but_not_the_sweep():
    from finetune.run.distributed import job_command_line

    argv = ["-m", "-cd", "my_configs", "--config-name=my_train", "-cp", "/abs/primary", "strategy=full,freeze",
            "hydra.searchpath=[file://more]", "hydra.sweep.dir=/sweeps/x"]
    hydra = ["hydra.searchpath=[file://more]", "hydra.sweep.dir=/sweeps/x", "hydra.mode=MULTIRUN",
             "hydra/launcher=basic"]
    assert job_command_line(argv, hydra, ["strategy=freeze"]) == [
        "-cd", "my_configs", "--config-name=my_train", "-cp", "/abs/primary", "hydra.searchpath=[file://more]",
        "strategy=freeze"]


def test_a_nan_loss_on_one_rank_stops_every_rank_with_the_one_line_error(tmp_path):
    """Two gloo processes, a non-finite loss on rank 1 only: the guard reduces its flag across ranks at each check,
    so both stop with the error; it used to stop rank 1 alone while rank 0 waited in its next all-reduce until the
    process group's timeout."""
    import subprocess
    import sys

    from tests.test_cli import cli_env

    command = [sys.executable, "-m", "finetune.train", *TINY, "strategy=freeze", "trainer=ddp_cpu",
               "callbacks.numerics_guard._target_=tests.run.faults.GuardSeeingNaNOnRank1", "+callbacks.numerics_guard.step=1",
               f"hydra.run.dir={tmp_path / 'run'}"]
    try:
        result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, env=cli_env(), timeout=180)
    except subprocess.TimeoutExpired:
        pytest.fail("a rank waited for the one that stopped: the run hung")
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: training loss became")]
    assert len(errors) == 2, result.stderr[-3000:]  # one line from each rank
    assert any("became nan at step 1 (epoch 0)" in e for e in errors), "rank 1 names its loss"
    assert any("non-finite on another rank at step 1 (epoch 0)" in e for e in errors), "rank 0 stops with it"
    assert not (tmp_path / "run" / "metrics.json").exists()


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_seed_null_under_ranks_that_torchrun_started_is_one_seed_for_every_rank(tmp_path):
    """torchrun (and SLURM's tasks) start every rank itself: no rank inherits another's environment, so each drew its
    own seed and their samplers disagreed. Rank 0's draw is broadcast before anything is built; the log and
    metrics.json give it."""
    import os
    import subprocess
    import sys

    from tests.test_cli import cli_env

    port = free_port()
    ranks = []
    for rank in range(2):  # what torchrun --nproc_per_node=2 sets for each process
        env = {**cli_env(), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2",
               "RANK": str(rank), "LOCAL_RANK": str(rank), "GROUP_RANK": "0", "LOCAL_WORLD_SIZE": "2",
               "TORCHELASTIC_RUN_ID": "test"}
        env.pop("FINETUNE_DRAWN_SEED", None)
        command = [sys.executable, "-m", "finetune.train", *TINY, "trainer=ddp_cpu", "trainer.max_epochs=1",
                   "seed=null", f"hydra.run.dir={tmp_path}", "+callbacks.seed._target_=tests.run.faults.WriteSeed",
                   "+callbacks.seed.output_dir=${paths.output_dir}"]
        ranks.append(subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outputs = [process.communicate(timeout=300)[0] for process in ranks]
    assert [process.returncode for process in ranks] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    seeds = {(tmp_path / f"seed_rank{rank}.txt").read_text() for rank in range(2)}
    assert len(seeds) == 1, f"the ranks ran with seeds {seeds}"
    assert json.loads((tmp_path / "metrics.json").read_text())["seed"] == int(seeds.pop())
    assert os.environ.get("FINETUNE_DRAWN_SEED") is None
