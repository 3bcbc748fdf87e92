"""finetune-compare: its strategies in their own processes, the scheduler, and the report from a multirun folder
(every strategy of the README's command is compared in tests/test_readme.py)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from finetune.report import collect_runs, format_text, write_report
from tests.conftest import TINY, compose_config
from tests.test_cli import run_cli, run_main


def fake_run(folder, strategy: str, seed: int, correct: np.ndarray, seconds: float, params: int,
             split: str = "digits-split-0", labels: np.ndarray | None = None) -> dict:
    """A run folder as finetune-train leaves it: metrics.json and predictions.csv (labels 0..9 unless given)."""
    labels = np.arange(len(correct)) % 10 if labels is None else labels
    predicted = np.where(correct, labels, (labels + 1) % 10)
    folder.mkdir(parents=True)
    lines = ["index,label,predicted,p_label"] + [f"{i},{label},{p},0.5" for i, (label, p) in
                                                 enumerate(zip(labels, predicted))]
    (folder / "predictions.csv").write_text("\n".join(lines) + "\n")
    metrics = {"strategy": strategy, "seed": seed, "backbone": "efficientnet_lite0", "data": "DigitsDataModule",
               "best_val_acc": float(correct.mean()), "test_acc": float(correct.mean()), "fit_seconds": seconds,
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
    assert "| strategy | test acc | 95% interval | p vs best | seeds |" in markdown
    assert markdown.index("recommended by") < markdown.index("| strategy |")
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and paths["png"].stat().st_size > 10_000
    text = format_text(summary)
    assert text.splitlines()[0].startswith("recommended by") and "5.2" in text
    assert "full" in text.splitlines()[0], "0.98 against 0.88 on 540 paired samples: full is the only choice"


def test_mcnemar_p_value_is_the_exact_binomial_on_the_discordant_samples():
    """Two prediction sets that differ in k = 7 + 2 samples: McNemar's exact p is 2 * P(X <= 2), X ~ Bin(9, 1/2)."""
    from math import comb

    from finetune.decide import mcnemar_exact

    a = np.ones(100, dtype=bool)
    b = a.copy()
    b[:7] = False  # a alone right on 7
    a[50:52] = False  # b alone right on 2
    p, only_a, only_b = mcnemar_exact(a, b)
    assert (only_a, only_b) == (7, 2)
    assert p == pytest.approx(2 * sum(comb(9, i) for i in range(3)) / 2 ** 9, rel=1e-12)
    assert mcnemar_exact(a, a)[0] == 1.0


def test_holm_and_the_interval_on_known_cases():
    from finetune.decide import bootstrap_interval, holm

    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5, 0.001]) == pytest.approx([0.5, 0.002])
    correct = np.zeros((1, 1000), dtype=bool)
    correct[0, :900] = True
    low, high = bootstrap_interval(correct)
    standard_error = (0.9 * 0.1 / 1000) ** 0.5  # the normal approximation's 95% interval, about +/- 0.0186
    assert low == pytest.approx(0.9 - 1.96 * standard_error, abs=0.004)
    assert high == pytest.approx(0.9 + 1.96 * standard_error, abs=0.004)
    assert bootstrap_interval(np.ones((3, 50), dtype=bool)) == (1.0, 1.0)


def test_the_recommendation_picks_the_cheaper_strategy_only_when_it_is_indistinguishable(tmp_path):
    from finetune.decide import decide
    from finetune.report import collect_runs

    generator = np.random.default_rng(1)
    best = generator.random(300) < 0.9
    close = best.copy()
    close[np.flatnonzero(best)[:3]] = False  # 3 fewer right: p = 0.25
    far = best.copy()
    far[np.flatnonzero(best)[:60]] = False  # 60 fewer right
    for name, correct, seconds, params in [("full", best, 100.0, 1000), ("norm", close, 40.0, 20),
                                           ("freeze", far, 10.0, 5)]:
        fake_run(tmp_path / "near" / name, name, 42, correct, seconds, params)
    decision = decide(collect_runs(tmp_path / "near"))
    assert decision["best"] == "full" and decision["by_time"] == "norm" and decision["by_params"] == "norm"
    assert not decision["strategies"]["norm"]["distinguishable"] and decision["strategies"]["freeze"]["distinguishable"]
    assert decision["lines"][0].startswith("recommended by fit time and trainable parameters: norm:")
    assert "not distinguishable from full" in decision["lines"][0] and "40% of its fit time" in decision["lines"][0]
    # the gap large: only the most accurate is left
    fake_run(tmp_path / "far" / "full", "full", 42, best, 100.0, 1000)
    fake_run(tmp_path / "far" / "freeze", "freeze", 42, far, 10.0, 5)
    decision = decide(collect_runs(tmp_path / "far"))
    assert decision["by_time"] == decision["by_params"] == "full"
    assert "the most accurate; nothing cheaper is indistinguishable" in decision["lines"][0]
    # nothing distinguishable: said so
    fake_run(tmp_path / "same" / "full", "full", 42, best, 100.0, 1000)
    fake_run(tmp_path / "same" / "norm", "norm", 42, close, 40.0, 20)
    assert decide(collect_runs(tmp_path / "same"))["lines"][0].startswith("no strategy is distinguishable")


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
    result = run_cli("finetune.compare", f"from={tmp_path / 'sweep'}", f"hydra.run.dir={tmp_path / 'out'}",
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "cached" in result.stdout and (tmp_path / "out" / "comparison.png").exists()


@pytest.mark.parametrize("problem", ["mixed splits", "repeated seed"])
def test_compare_from_refuses_runs_that_cannot_be_paired(tmp_path, problem):
    fake_multirun(tmp_path / "sweep")
    correct = np.ones(270, dtype=bool)
    if problem == "mixed splits":
        fake_run(tmp_path / "sweep" / "norm_seed42", "norm", 42, correct, 5.0, 20, split="digits-split-1")
        expected = "tested on 2 different splits or datasets"
    else:
        fake_run(tmp_path / "sweep" / "full_again", "full", 42, correct, 5.0, 20)
        expected = "two runs of strategy full with seed 42"
    result = run_main("finetune.compare", f"from={tmp_path / 'sweep'}", f"hydra.run.dir={tmp_path / 'out'}",
                      cwd=tmp_path)
    assert result.returncode == 2 and expected in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not list((tmp_path / "out").glob("comparison*")), "nothing written"


@pytest.mark.parametrize("seeds,expected", [("[]", "compare.seeds is empty"), ("[1,2,1]", "repeats [1]")])
def test_compare_refuses_bad_seeds(tmp_path, seeds, expected):
    result = run_main("finetune.compare", f"compare.seeds={seeds}", f"hydra.run.dir={tmp_path}", cwd=tmp_path)
    assert result.returncode == 2 and expected in result.stderr and not list(tmp_path.glob("*_seed*"))


def test_compare_rejects_an_unknown_strategy(tmp_path):
    result = run_main("finetune.compare", "compare.strategies=[full,frozen]", f"hydra.run.dir={tmp_path}", cwd=tmp_path)
    from finetune.config import strategy_names

    assert result.returncode == 2 and f"choose from: {', '.join(strategy_names())}" in result.stderr


def test_compare_trains_each_strategy_and_seed_in_its_own_process_two_at_once(tmp_path):
    """The real thing: the sweep's local_processes launcher runs each (strategy, seed) as a `python -m
    finetune.train` child with the overrides given, two at once."""
    out = tmp_path / "out"
    result = run_main("finetune.compare", *TINY, "trainer.max_epochs=1", "compare.strategies=[freeze,cached]",
                      "compare.seeds=[1,2]", "compare.jobs=2", f"paths.cache_dir={tmp_path / 'cache'}",
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
    from finetune import compare

    commands = []
    monkeypatch.setattr(compare, "run_sweep", lambda command: commands.append(command) or 1)
    result = run_main("finetune.compare", *TINY, "compare.strategies=[freeze,full]", "compare.seeds=[1,2]",
                      "hydra/launcher=slurm", "hydra.launcher.partition=gpu", f"hydra.run.dir={tmp_path}",
                      cwd=tmp_path)
    assert result.returncode == 2 and "every run failed" in result.stderr  # nothing ran: no cluster here
    command = commands[0]
    assert command[1:6] == ["-m", "finetune.train", "-m", "strategy=freeze,full", "seed=1,2"]
    assert "hydra/launcher=slurm" in command and "hydra.launcher.partition=gpu" in command
    overrides = [o for o in command[5:] if not o.startswith(("hydra.sweep", "seed="))]
    config = compose_config(tmp_path, [o for o in overrides if not o.startswith("strategy=")] + ["strategy=full"],
                            return_hydra=True)
    assert config.hydra.launcher._target_.endswith("SlurmLauncher") and config.hydra.launcher.partition == "gpu"
    assert config.hydra.launcher.tasks_per_node == 4
