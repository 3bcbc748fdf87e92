"""finetune-compare: its strategies in their own processes, the scheduler, and the report from a multirun folder
(every strategy of the README's command is compared in tests/test_readme.py)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from finetune.compare.report import collect_runs, format_text, write_report
from tests.conftest import TINY, compose_config
from tests.test_cli import run_cli, run_main


def fake_run(folder, strategy: str, seed: int, correct: np.ndarray, seconds: float, params: int,
             split: str = "digits-split-0", labels: np.ndarray | None = None, val: float | None = None) -> dict:
    """A run folder as finetune-train leaves it: metrics.json and predictions.csv (labels 0..9 unless given)."""
    labels = np.arange(len(correct)) % 10 if labels is None else labels
    predicted = np.where(correct, labels, (labels + 1) % 10)
    folder.mkdir(parents=True)
    lines = ["index,label,predicted,p_label"] + [f"{i},{label},{p},0.5" for i, (label, p) in
                                                 enumerate(zip(labels, predicted))]
    (folder / "predictions.csv").write_text("\n".join(lines) + "\n")
    metrics = {"strategy": strategy, "seed": seed, "backbone": "efficientnet_lite0", "data": "DigitsDataModule",
               "best_val_acc": float(correct.mean()) if val is None else val, "test_acc": float(correct.mean()), "fit_seconds": seconds,
               "train_samples_per_second": 1257 * 10 / seconds, "peak_memory_mb": 1000.0,
               "trainable_params": params, "total_params": 3383818, "epochs": 10, "device": "cpu",
               "predictions": "predictions.csv", "test_split_id": split, "test_samples": len(correct)}
    if strategy == "cached":
        metrics.update(extract_seconds=5.2, cache_hit=False)
    (folder / "metrics.json").write_text(json.dumps(metrics))
    return metrics


def fake_multirun(folder, seeds=(42,)):
    generator = np.random.default_rng(0)
    for seed in seeds:
        for strategy, accuracy, seconds, params in [("cached", 0.88, 0.7, 12810), ("full", 0.98, 80.0, 3383818),
                                                    ("no_grad", 0.88, 20.0, 12810)]:
            fake_run(folder / f"{strategy}_seed{seed}", strategy, seed, generator.random(270) < accuracy, seconds,
                     params)
    (folder / "multirun.yaml").write_text("hydra: {}\n")


def test_report_from_a_multirun_folder(tmp_path):
    fake_multirun(tmp_path / "sweep", seeds=(42, 43))
    rows = collect_runs(tmp_path / "sweep")
    assert [r["strategy"] for r in rows] == ["full"] * 2 + ["no_grad"] * 2 + ["cached"] * 2, "their natural order"
    paths, summary = write_report(rows, tmp_path / "report")
    with open(paths["csv"]) as handle:
        table = list(csv.DictReader(handle))
    assert [r["strategy"] for r in table] == ["full", "no_grad", "cached"], "a row per strategy"
    assert table[2]["extract_seconds"] == "5.2" and table[2]["cache_hit"] == "False" and table[2]["seeds"] == "2"
    assert float(table[0]["ci_low"]) < float(table[0]["test_acc"]) < float(table[0]["ci_high"])
    with open(paths["runs"]) as handle:
        assert len(list(csv.DictReader(handle))) == 6, "and a row per run"
    with open(paths["per_class"]) as handle:
        per_class = list(csv.DictReader(handle))
    assert [r["strategy"] for r in per_class] == ["full", "no_grad", "cached"] and "class_9" in per_class[0]
    markdown = paths["md"].read_text()
    assert ("| strategy | test acc | 95% interval | seed sd (points) | difference to reference (points, 95%) | verdict |"
            in markdown)
    assert [r["verdict"] for r in table] == ["reference", "undecided", "undecided"], "2 seeds: 1 degree of freedom"
    assert markdown.index("recommended by") < markdown.index("| strategy |")
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and paths["png"].stat().st_size > 10_000
    text = format_text(summary)
    assert text.splitlines()[0].startswith("recommended by") and "5.2" in text
    assert "full, the reference" in text.splitlines()[0], "0.98 against 0.88: nothing cheaper is equivalent"


def flipped(correct: np.ndarray, generator, share: float = 0.01) -> np.ndarray:
    """`correct` with `share` of its right cells made wrong and as many wrong ones made right (on average): the same
    expected accuracy, other predictions."""
    rate = np.where(correct, share, share * correct.mean() / (1 - correct.mean()))
    flip = generator.random(correct.shape) < rate
    return np.where(flip, ~correct, correct)


def difference_of(other: np.ndarray, reference: np.ndarray):
    from finetune.compare.statistics import interval

    return interval([other.astype(np.int8) - reference.astype(np.int8)])


@pytest.mark.parametrize("missed,expected", [(2, "undecided"), (30, "different")])
def test_the_same_images_missed_in_every_seed_count_once_each(missed, expected):
    """The unit is the test image: 2 images missed under each of 5 seeds are 2 images (an exact sign test would give
    p = 0.5), not 10 independent pairs; 30 are evidence. The verdict at a margin of 0.5 point (too small to show
    equivalence on 270 images)."""
    from finetune.compare.statistics import verdict

    reference = np.ones((5, 270), dtype=bool)
    other = reference.copy()
    other[:, :missed] = False
    difference = difference_of(other, reference)
    assert float(difference.estimate) == pytest.approx(-missed / 270)
    assert str(verdict(difference, 0.005)) == expected
    # with no seed-to-seed spread, the interval is the paired interval over images: sd of the per-image difference
    p = missed / 270
    half = 1.969 * (p * (1 - p) * 270 / 269 / 270) ** 0.5
    assert float(difference.high - difference.low) / 2 == pytest.approx(half, rel=0.01)


def test_a_seed_that_moves_everything_widens_the_interval_by_the_seeds_few_degrees_of_freedom():
    """Per-seed differences of -4, 0 and +4 points on identical images: the seeds disagree, so with 3 seeds the
    interval is at least the t interval over seeds (2 degrees of freedom), not the images' narrow one."""
    from scipy import stats

    reference = np.zeros((3, 400), dtype=bool)
    reference[:, :200] = True
    other = reference.copy()
    other[0, :16] = False
    other[2, 200:216] = True
    difference = difference_of(other, reference)
    over_seeds = stats.t.ppf(0.975, 2) * np.std([-0.04, 0.0, 0.04], ddof=1) / 3 ** 0.5
    assert float(difference.estimate) == pytest.approx(0.0)
    assert float(difference.high) >= 0.95 * over_seeds and float(difference.seed_sd) == pytest.approx(0.04)


def test_equivalence_needs_the_whole_interval_inside_the_margin_and_one_run_decides_nothing():
    from finetune.compare.statistics import verdict

    generator = np.random.default_rng(3)
    reference = generator.random((5, 2000)) < 0.9
    other = flipped(reference, generator)
    difference = difference_of(other, reference)
    assert str(verdict(difference, 0.02)) == "equivalent" and str(verdict(difference, 0.001)) == "undecided"
    assert str(verdict(difference_of(other[:1], reference[:1]), 0.02)) == "undecided", "one run: seed share unknown"


def test_the_fixed_sequence_stops_at_the_first_claim_not_shown():
    from finetune.compare.statistics import fixed_sequence

    shown = {"lora": True, "norm": True, "freeze": False, "cached": True}
    assert fixed_sequence(["lora", "norm", "freeze", "cached"], shown) == ["lora", "norm"]
    assert fixed_sequence(["freeze", "lora"], shown) == []


# -- simulations: the error rates the method promises, with the project's own functions (pure numpy) ----------------

@pytest.mark.parametrize("seeds", [1, 3, 5])
@pytest.mark.parametrize("seed_sd", [0.0, 0.3])
def test_false_different_rate_stays_at_alpha(seeds, seed_sd):
    """Two strategies of equal expected accuracy on 400 images, 2,000 comparisons: "different" at most 6% of the time,
    without and with a seed effect (seed_sd 0.3 logit: about 2 points of spread between seeds, the README's)."""
    from finetune.compare.statistics import Scenario, operating_characteristics

    result = operating_characteristics(Scenario(seeds=seeds, samples=400, seed_sd=seed_sd), margin=0.02)
    assert result["different"] <= 0.06, result


def test_interval_coverage_with_a_seed_effect_and_power_for_three_points():
    from finetune.compare.statistics import Scenario, operating_characteristics

    for seeds in (3, 5):
        covered = operating_characteristics(Scenario(seeds=seeds, seed_sd=0.3, difference=0.03), margin=0.02)
        assert covered["coverage"] >= 0.9, covered
    found = operating_characteristics(Scenario(seeds=5, samples=400, difference=0.03), margin=0.02)
    assert found["different"] >= 0.6, found  # 0.70 at the default 5 seeds without a seed effect (docs)


def test_the_interval_resamples_splits_too():
    """Three splits whose true difference moves by split (a split effect the seeds cannot show): the interval over
    splits covers the mean difference."""
    from finetune.compare.statistics import Scenario, interval, simulate

    generator = np.random.default_rng(5)
    tables = []
    for shift in (-0.04, 0.0, 0.04):
        correct = simulate(Scenario(seeds=3, samples=300, difference=shift), 500, generator)[0]
        tables.append(correct[:, 1].astype(np.int8) - correct[:, 0].astype(np.int8))
    split_level = interval(tables)
    assert np.mean((split_level.low <= 0) & (0 <= split_level.high)) >= 0.9
    assert np.median(split_level.high - split_level.low) > np.median(interval(tables[1:2]).high
                                                                      - interval(tables[1:2]).low)


def best_close_and_worse(seed: int, worse_by: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """3 seeds x 2,000 test images: the best strategy's correct cells, one of the same expected accuracy, and one
    that misses `worse_by` more images in every seed."""
    generator = np.random.default_rng(seed)
    best = generator.random((3, 2000)) < 0.9
    worse = best.copy()
    worse[:, np.flatnonzero(best[0])[:worse_by]] = False
    return best, flipped(best, generator), worse


def fake_runs(folder, strategies) -> None:
    """fake_run for every seed of each (name, correct per seed, fit seconds, trainable params, val score)."""
    for name, correct, seconds, params, val in strategies:
        for seed in range(len(correct)):
            fake_run(folder / f"{name}_seed{seed}", name, seed, correct[seed], seconds, params, val=val)


def test_the_recommendation_is_the_cheapest_strategy_shown_equivalent(tmp_path):
    from finetune.compare.decide import decide
    from finetune.compare.report import collect_runs

    best, close, far = best_close_and_worse(1, worse_by=300)
    fake_runs(tmp_path / "near", [("full", best, 100.0, 1000, 0.95), ("norm", close, 40.0, 20, 0.94),
                                  ("freeze", far, 10.0, 5, 0.80)])
    decision = decide(collect_runs(tmp_path / "near"), margin_points=2.0)
    assert decision["reference"] == "full", "the best val score, not the best test score"
    assert decision["by_time"] == decision["by_params"] == "norm"
    stats = decision["strategies"]
    assert [stats[s]["verdict"] for s in ("full", "norm", "freeze")] == ["reference", "equivalent", "different"]
    assert decision["lines"][0].startswith("recommended by fit time and trainable parameters: norm:")
    assert "equivalent to the reference full" in decision["lines"][0] and "40% of its fit time" in decision["lines"][0]
    # reference by name; a margin too small for 2,000 images: none is shown equivalent, said plainly
    decision = decide(collect_runs(tmp_path / "near"), margin_points=0.1, reference="norm")
    assert decision["reference"] == "norm" and decision["by_time"] == "norm"
    assert "no cheaper strategy is shown equivalent" in decision["lines"][0]


def test_adding_a_strategy_never_makes_a_cheap_one_easier_to_recommend(tmp_path):
    """Fixed sequence in cost order: a strategy between the reference and a cheap one in cost adds a step before it."""
    from finetune.compare.decide import decide
    from finetune.compare.report import collect_runs

    best, close, middle = best_close_and_worse(2, worse_by=200)
    for folder in ("two", "three"):
        fake_runs(tmp_path / folder, [("full", best, 100.0, 10, 0.9), ("cached", close, 5.0, 10, 0.9)])
    fake_runs(tmp_path / "three", [("lora", middle, 50.0, 10, 0.5)])
    assert decide(collect_runs(tmp_path / "two"), reference="full")["by_time"] == "cached"
    three = decide(collect_runs(tmp_path / "three"), reference="full")
    assert three["order"] == ["lora", "cached"] and three["by_time"] == "full"
    assert three["strategies"]["cached"]["verdict"] != "equivalent" and three["strategies"]["cached"]["sequence_stopped"]


def test_per_sample_predictions_agree_with_the_runs_test_accuracy(tmp_path):
    from finetune.train import train
    from tests.conftest import compose_config

    metrics = train(compose_config(tmp_path, [*TINY, "strategy=freeze", "data.num_samples=200"]))
    with open(tmp_path / metrics["predictions"]) as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["index"]) for r in rows] == list(range(50)) == list(range(metrics["test_samples"]))
    assert sum(r["label"] == r["predicted"] for r in rows) / len(rows) == pytest.approx(metrics["test_acc"], abs=1e-6)
    assert all(0 <= float(r["p_label"]) <= 1 for r in rows)


def test_compare_from_cli_on_an_existing_multirun(tmp_path):
    fake_multirun(tmp_path / "sweep")
    result = run_cli("finetune.compare.cli", f"from={tmp_path / 'sweep'}", f"hydra.run.dir={tmp_path / 'out'}",
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "cached" in result.stdout and (tmp_path / "out" / "comparison.png").exists()
    # a sweep (or a comparison from before tuning) has no tune/ folder: no tuning section, no tuning columns filled
    assert "## Tuning" not in (tmp_path / "out" / "comparison.md").read_text()
    assert not (tmp_path / "out" / "tuning.png").exists()


@pytest.mark.parametrize("problem", ["unpaired split", "repeated seed", "short file", "shifted indices",
                                     "no trainable_params", "missing file", "unknown reference"])
def test_compare_from_refuses_runs_that_cannot_be_paired(tmp_path, problem):
    fake_multirun(tmp_path / "sweep")
    correct = np.ones(270, dtype=bool)
    norm = tmp_path / "sweep" / "norm_seed42"
    extra = []
    if problem == "unpaired split":
        fake_run(norm, "norm", 42, correct, 5.0, 20, split="digits-split-1")
        expected = "share no (split, seed)"
    elif problem == "repeated seed":
        fake_run(tmp_path / "sweep" / "full_again", "full", 42, correct, 5.0, 20)
        expected = "two runs of strategy full with seed 42"
    elif problem == "short file":
        fake_run(norm, "norm", 42, correct, 5.0, 20)
        (norm / "predictions.csv").write_text("\n".join((norm / "predictions.csv").read_text().splitlines()[:-1]))
        expected = "predictions.csv has 269 rows but metrics.json tested 270"
    elif problem == "shifted indices":
        fake_run(norm, "norm", 42, correct, 5.0, 20)
        lines = (norm / "predictions.csv").read_text().splitlines()
        (norm / "predictions.csv").write_text("\n".join([lines[0]] + [f"{i + 1},{line.split(',', 1)[1]}"
                                                                        for i, line in enumerate(lines[1:])]))
        expected = "different test indices"
    elif problem == "no trainable_params":
        fake_run(norm, "norm", 42, correct, 5.0, 20)
        metrics = json.loads((norm / "metrics.json").read_text())
        del metrics["trainable_params"]
        (norm / "metrics.json").write_text(json.dumps(metrics))
        expected = "norm_seed42 has no trainable_params"
    elif problem == "missing file":
        fake_run(norm, "norm", 42, correct, 5.0, 20)
        (norm / "predictions.csv").unlink()
        expected = "norm_seed42 has no predictions.csv"
    else:
        extra = ["compare.reference=lora"]
        expected = "compare.reference=lora is not among the strategies compared; choose one of: best_val, cached"
    result = run_main("finetune.compare.cli", f"from={tmp_path / 'sweep'}", *extra, f"hydra.run.dir={tmp_path / 'out'}",
                      cwd=tmp_path)
    assert result.returncode == 2 and expected in result.stderr and len(result.stderr.strip().splitlines()) == 1, \
        result.stderr[-2000:]
    assert not list((tmp_path / "out").glob("comparison*")), "nothing written"


@pytest.mark.parametrize("setting,expected", [
    ("compare.margin=0", "compare.margin=0 is in accuracy points and must lie strictly between 0 and 100"),
    ("compare.margin=100", "compare.margin=100 is in accuracy points"),
    ("compare.splits=0", "compare.splits=0 must be an integer of at least 1"),
    ("compare.reference=frozen", "compare.reference=frozen is not among the strategies compared; choose one of: "
                                 "best_val, freeze, full")])
def test_compare_refuses_bad_statistics_settings_before_running_anything(tmp_path, monkeypatch, setting, expected):
    from finetune.compare import cli as compare

    commands = []
    monkeypatch.setattr(compare, "run_sweep", lambda command: commands.append(command) or 0)
    result = run_main("finetune.compare.cli", *TINY, "compare.strategies=[freeze,full]", setting,
                      f"hydra.run.dir={tmp_path}", cwd=tmp_path)
    assert result.returncode == 2 and expected in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not commands, "nothing run"


def test_compare_splits_sweeps_the_split_seed(tmp_path, monkeypatch):
    from finetune.compare import cli as compare

    commands = []
    monkeypatch.setattr(compare, "run_sweep", lambda command: commands.append(command) or 1)
    result = run_main("finetune.compare.cli", *TINY, "compare.strategies=[freeze,full]", "compare.seeds=[1,2]",
                      "compare.tune.trials=0", "compare.splits=3", "data.split_seed=5", f"hydra.run.dir={tmp_path}", cwd=tmp_path)
    assert result.returncode == 2 and "every run failed" in result.stderr  # nothing ran
    command = commands[0]
    assert "data.split_seed=5,6,7" in command and "data.split_seed=5" not in command
    assert "hydra.sweep.subdir=${hydra.runtime.choices.strategy}_split${data.split_seed}_seed${seed}" in command


def test_report_over_splits_pairs_within_each_split(tmp_path):
    from finetune.compare.decide import decide

    generator = np.random.default_rng(4)
    for split in range(2):
        for seed in (1, 2, 3):
            base = generator.random(300) < 0.9
            fake_run(tmp_path / f"full_split{split}_seed{seed}", "full", seed, base, 50.0, 1000,
                     split=f"digits-split-{split}", val=0.9)
            fake_run(tmp_path / f"freeze_split{split}_seed{seed}", "freeze", seed, base & (generator.random(300) < 0.7),
                     5.0, 10, split=f"digits-split-{split}", val=0.6)
    decision = decide(collect_runs(tmp_path))
    freeze = decision["strategies"]["freeze"]
    assert freeze["splits"] == 2 and freeze["paired_runs"] == 6 and freeze["verdict"] == "different"
    assert decision["reference"] == "full" and decision["by_time"] == "full"


@pytest.mark.parametrize("seeds,expected", [("[]", "compare.seeds is empty"), ("[1,2,1]", "repeats [1]")])
def test_compare_refuses_bad_seeds(tmp_path, seeds, expected):
    result = run_main("finetune.compare.cli", f"compare.seeds={seeds}", f"hydra.run.dir={tmp_path}", cwd=tmp_path)
    assert result.returncode == 2 and expected in result.stderr and not list(tmp_path.glob("*_seed*"))


def test_compare_rejects_an_unknown_strategy(tmp_path):
    result = run_main("finetune.compare.cli", "compare.strategies=[full,frozen]", f"hydra.run.dir={tmp_path}", cwd=tmp_path)
    from finetune.config import strategy_names

    assert result.returncode == 2 and f"choose from: {', '.join(strategy_names())}" in result.stderr


def test_compare_trains_each_strategy_and_seed_in_its_own_process_two_at_once(tmp_path):
    """The real thing: the sweep's local_processes launcher runs each (strategy, seed) as a `python -m
    finetune.train` child with the overrides given, two at once."""
    out = tmp_path / "out"
    result = run_main("finetune.compare.cli", *TINY, "trainer.max_epochs=1", "compare.strategies=[freeze,cached]",
                      "compare.seeds=[1,2]", "compare.jobs=2", "compare.tune.trials=0", f"paths.cache_dir={tmp_path / 'cache'}",
                      f"hydra.run.dir={out}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = sorted(p.parent.name for p in out.glob("*/metrics.json"))
    assert runs == ["cached_seed1", "cached_seed2", "freeze_seed1", "freeze_seed2"]
    assert {json.loads((out / run / "metrics.json").read_text())["seed"] for run in runs} == {1, 2}
    assert (out / "freeze_seed1" / "train.log").exists() and (out / "comparison.md").exists()
    starts = [json.loads((out / run / "metrics.json").read_text()) for run in runs]
    assert len({m["test_split_id"] for m in starts}) == 1, "one split for every seed"
    assert "recommended by" in result.stdout and "freeze" in result.stdout


class HydraContextStub:
    """What the launcher uses of Hydra's context: a sweep config per job (here the master config, copied)."""

    class config_loader:  # noqa: N801 - Hydra's attribute name
        @staticmethod
        def load_sweep_config(master, overrides):
            import copy

            return copy.deepcopy(master)


def test_the_launcher_runs_jobs_at_once_and_gives_each_its_own_gpu(monkeypatch, tmp_path):
    """local_processes with jobs=2 on a (pretend) 2-GPU node: two children at a time, each CUDA_VISIBLE_DEVICES a
    different GPU, the next started as soon as either finishes; each job's JobReturn holds the value it wrote, a
    failed job's None (as a job the in-process launcher runs returns), and the rest go on."""
    from hydra_plugins.finetune_launcher import local_processes

    started, finished = [], []

    class Child:
        def __init__(self, command, env):
            self.name = next(w for w in command if w.startswith("strategy=")).split("=", 1)[1]
            self.gpu, self.polls, self.returncode = env["CUDA_VISIBLE_DEVICES"], {"long": 30}.get(self.name, 2), None
            started.append((self.name, self.gpu, [n for n, _, _ in started if n not in finished]))
            if self.name != "bad":  # what report_user_errors writes for a job that returned
                Path(env[local_processes.JOB_RETURN_ENV]).write_text(json.dumps({"return_value": len(self.name)}))

        def poll(self):
            self.polls -= 1
            if self.polls <= 0 and self.returncode is None:
                self.returncode = int(self.name == "bad")
                finished.append(self.name)
            return self.returncode

    monkeypatch.setattr(local_processes.subprocess, "Popen", Child)
    monkeypatch.setattr(local_processes.time, "sleep", lambda seconds: None)
    launcher = local_processes.LocalProcessesLauncher(jobs=2, gpus=[3, 5])
    config = compose_config(tmp_path, ["hydra.sweep.dir=" + str(tmp_path / "sweep")], return_hydra=True)
    launcher.setup(hydra_context=HydraContextStub(), task_function=None, config=config)
    results = launcher.launch([[f"strategy={name}"] for name in ("long", "short", "bad", "last")], 0)
    assert [(name, gpu) for name, gpu, _ in started] == [("long", "3"), ("short", "5"), ("bad", "5"), ("last", "5")]
    assert started[-1][2] == ["long"], "the last started while the long one still ran"
    assert [r.status.name for r in results] == ["COMPLETED"] * 4
    assert [r.return_value for r in results] == [4, 5, None, 4]
    failure = json.loads((tmp_path / "sweep" / "2" / "failure.json").read_text())
    assert failure["job"] == 2 and "exited with 1 without a failure record" in failure["error"]


@pytest.mark.parametrize("jobs,user_threads,expected", [(2, None, "1"), (1, None, None), (2, "3", "3")])
def test_cpu_jobs_side_by_side_share_the_cores(monkeypatch, tmp_path, jobs, user_threads, expected):
    """Two CPU jobs at once on 2 cores get one thread each (torch's default, every core each, oversubscribes: an
    epoch took 3x as long); one job keeps torch's default; a user's OMP_NUM_THREADS is left as it is."""
    from hydra_plugins.finetune_launcher import local_processes

    envs = []

    class Child:
        returncode = 0

        def __init__(self, command, env):
            envs.append(env)

        def poll(self):
            return 0

    monkeypatch.setattr(local_processes.subprocess, "Popen", Child)
    monkeypatch.setattr(local_processes.time, "sleep", lambda seconds: None)
    monkeypatch.setattr(local_processes.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    if user_threads is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", user_threads)
    launcher = local_processes.LocalProcessesLauncher(jobs=jobs, gpus=[])
    config = compose_config(tmp_path, ["hydra.sweep.dir=" + str(tmp_path / "sweep")], return_hydra=True)
    launcher.setup(hydra_context=HydraContextStub(), task_function=None, config=config)
    launcher.launch([["strategy=freeze"], ["strategy=full"]], 0)
    assert {env.get("OMP_NUM_THREADS") for env in envs} == {expected}


@pytest.mark.slow
def test_a_failed_job_of_a_local_processes_sweep_ends_in_the_summary_and_jobs_return_their_metric(tmp_path):
    """One job of two fails in its own process: the sweep used to end in Hydra's traceback ("job 1 exited with 2")
    without the summary; now the other job finishes, the summary names the failed one, exit 1, no traceback. The
    finished job's value is its optimized_metric (what an Optuna sweeper reads), not its exit code."""
    sweep = tmp_path / "sweep"
    result = run_cli("finetune.train", "-m", *TINY, "strategy=freeze", "trainer.max_epochs=1",
                     "optimized_metric=val/loss,val/nope", "hydra/launcher=local_processes",
                     f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    summary = result.stderr[result.stderr.index("1 of 2 jobs failed"):]
    assert "job 1 [" in summary and "optimized_metric=val/nope" in summary
    assert "optimized_metric='val/nope'; choose one of" in summary
    metrics = json.loads((sweep / "0" / "metrics.json").read_text())
    returned = json.loads((sweep / "0" / "job_return.json").read_text())["return_value"]
    assert returned == pytest.approx(metrics["best_val_loss"]) and returned > 0


def test_compare_on_slurm_composes_the_submitit_sweep(tmp_path, monkeypatch):
    """`finetune-compare hydra/launcher=slurm ...`: the sweep it starts uses the submitit launcher with the user's
    settings, every (strategy, seed) a SLURM job; composed here (no cluster), as the sweep would compose it."""
    from finetune.compare import cli as compare

    commands = []
    monkeypatch.setattr(compare, "run_sweep", lambda command: commands.append(command) or 1)
    result = run_main("finetune.compare.cli", *TINY, "compare.strategies=[freeze,full]", "compare.seeds=[1,2]",
                      "compare.tune.trials=0", "hydra/launcher=slurm", "hydra.launcher.partition=gpu",
                      f"hydra.run.dir={tmp_path}", cwd=tmp_path)
    assert result.returncode == 2 and "every run failed" in result.stderr  # nothing ran: no cluster here
    command = commands[0]
    assert command[1:4] == ["-m", "finetune.train", "-m"] and {"strategy=freeze,full", "seed=1,2"} <= set(command)
    assert "hydra/launcher=slurm" in command and "hydra.launcher.partition=gpu" in command
    overrides = [o for o in command[4:] if not o.startswith(("hydra.sweep", "seed="))]
    config = compose_config(tmp_path, [o for o in overrides if not o.startswith("strategy=")] + ["strategy=full"],
                            return_hydra=True)
    assert config.hydra.launcher._target_.endswith("SlurmLauncher") and config.hydra.launcher.partition == "gpu"
    assert config.hydra.launcher.tasks_per_node == 4
