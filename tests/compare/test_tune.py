"""finetune-compare's tuning (compare.tune): each strategy's search_space tried on val under one budget, the test split
evaluated only by the final runs; the settings and spaces refused in one line before anything runs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from finetune.compare import tune
from finetune.config import strategy_names
from finetune.errors import ConfigError
from tests.compare.test_compare import fake_run
from tests.conftest import TINY, compose_config
from tests.test_cli import run_main


@pytest.mark.parametrize("setting,expected", [
    ({"trials": -1}, "compare.tune.trials=-1 must be an integer of at least 0"),
    ({"trials": 2.5}, "compare.tune.trials=2.5 must be an integer"),
    ({"trials": 4, "max_minutes": 0}, "compare.tune.max_minutes=0 must be a number of minutes above 0"),
    ({"trials": 4, "seed": 42}, "compare.tune.seed=42 is one of compare.seeds=[42, 43]"),
    ({"trials": 4, "pruner": "mean"}, "compare.tune.pruner=mean; choose one of: median, hyperband"),
    ({"trials": 4, "warmup_epochs": -1}, "compare.tune.warmup_epochs=-1 must be an integer of at least 0")])
def test_a_bad_budget_is_one_line_naming_what_is_valid(setting, expected):
    with pytest.raises(ConfigError, match="^" + expected.replace("[", r"\[").replace("]", r"\]")):
        tune.checked_budget(setting, [42, 43])


def test_the_budget_is_the_same_for_all_and_zero_means_untuned():
    budget = tune.checked_budget({"trials": 0, "seed": 42}, [42])  # untuned: the seed is never used
    assert budget.trials == 0
    assert tune.checked_budget(OmegaConf.create({"trials": 3, "max_minutes": 1.5}), [1]).max_minutes == 1.5


def strategy_cfg(tmp_path: Path, strategy: str, *overrides: str):
    return compose_config(tmp_path, [*TINY, f"strategy={strategy}", *overrides])


@pytest.mark.parametrize("strategy", strategy_names())
def test_every_shipped_strategy_declares_a_space_of_real_fields(tmp_path, strategy):
    cfg = strategy_cfg(tmp_path, strategy)
    plan = tune.plan_of(strategy, cfg)
    assert plan.space, f"{strategy} has no search_space: it would run untuned"
    assert "optimizer.weight_decay" in plan.space, "every strategy tunes its weight decay"
    expected = {"cached": "head_grid", "lp_ft": "head_grid+optuna"}.get(strategy, "optuna")
    assert plan.method == expected


def test_a_preset_drops_an_inherited_key_with_null(tmp_path):
    space = tune.plan_of("gradual_fastai", strategy_cfg(tmp_path, "gradual_fastai")).space
    assert "strategy.phases.2.lr" not in space and "optimizer.layer_decay" in space  # two phases, not three
    assert "strategy.phases.2.lr" in tune.plan_of("gradual", strategy_cfg(tmp_path, "gradual")).space


@pytest.mark.parametrize("entry,expected", [
    ("optimizer.lrr: tag(log, interval(1e-4, 1e-1))", "search_space key optimizer.lrr names no field of its config"),
    ("optimizer.lr: tag(log, interval(1e-1, 1e-4))", "is an empty or inverted range (low 0.1 must be below high"),
    ("optimizer.lr: interval(0.01, 0.01)", "is an empty or inverted range"),
    ("optimizer.lr: tag(log, interval(0.0, 0.1))", "is on a log scale and needs a low end above 0"),
    ("optimizer.lr: 0.01", "is one value, not a range"),
    ("head.dropout: choice(0.1)", "offers fewer than two choices"),
    ("optimizer.lr: interval(1e-4", "is not a range Optuna reads")])
def test_a_bad_search_space_is_one_line(tmp_path, entry, expected):
    cfg = strategy_cfg(tmp_path, "freeze")
    key, value = entry.split(": ", 1)
    cfg.search_space = {key: value}
    with pytest.raises(ConfigError) as raised:
        tune.plan_of("freeze", cfg)
    message = str(raised.value)
    assert expected in message and message.startswith("strategy freeze: ") and "\n" not in message


def test_the_head_grid_refuses_a_key_it_cannot_vary(tmp_path):
    cfg = strategy_cfg(tmp_path, "cached")
    cfg.search_space["optimizer.lr"] = "choice(0.1, 0.01)"
    with pytest.raises(ConfigError, match="the head grid tries numbers in a range"):
        tune.plan_of("cached", cfg)


def test_the_latin_hypercube_takes_every_stratum_of_each_range_once():
    space = {"optimizer.lr": "tag(log, interval(1e-4, 1e-1))", "optimizer.weight_decay": "interval(0.0, 0.1)"}
    points = tune.latin_hypercube(space, 16, seed=3)
    assert points == tune.latin_hypercube(space, 16, seed=3) != tune.latin_hypercube(space, 16, seed=4)
    lr = np.log10([p["optimizer.lr"] for p in points])
    decay = np.array([p["optimizer.weight_decay"] for p in points])
    assert sorted(np.floor((lr + 4) / 3 * 16).astype(int)) == list(range(16)), "one lr per sixteenth of the decades"
    assert sorted(np.floor(decay / 0.1 * 16).astype(int)) == list(range(16))


def test_the_cost_that_picks_the_recommendation_counts_the_tuning(tmp_path):
    """freeze and no_grad give the same predictions; no_grad fits faster but tuned for longer: counted with its
    tuning it is the dearer one, and the recommendation says both costs."""
    from finetune.compare.decide import decide
    from finetune.compare.report import collect_runs

    generator = np.random.default_rng(0)
    for seed in (1, 2, 3):
        correct = generator.random(400) < 0.9
        fake_run(tmp_path / f"freeze_seed{seed}", "freeze", seed, correct, 10.0, 100, val=0.9)
        fake_run(tmp_path / f"no_grad_seed{seed}", "no_grad", seed, correct, 8.0, 100, val=0.9)
    runs = collect_runs(tmp_path)
    assert decide(runs, reference="freeze")["by_time"] == "no_grad"
    tuned = decide(runs, reference="freeze", tuning_seconds={"freeze": 10.0, "no_grad": 30.0})
    assert tuned["by_time"] == "freeze"
    assert tuned["strategies"]["no_grad"]["cost_seconds"] == 38.0
    assert tuned["strategies"]["no_grad"]["fit_cost_seconds"] == 8.0
    decision = decide(runs, reference="no_grad", tuning_seconds={"freeze": 10.0, "no_grad": 30.0})
    assert decision["by_time"] == "freeze" and "53% of its cost with tuning (125% of its fit time without)" in \
        decision["lines"][0]


@pytest.mark.parametrize("setting,expected", [
    ("compare.tune.trials=-2", "compare.tune.trials=-2 must be an integer of at least 0"),
    ("compare.tune.seed=42", "compare.tune.seed=42 is one of compare.seeds=[42, 43, 44, 45, 46]"),
    ("+search_space.lrr='interval(0.1,0.2)'", "search_space key lrr names no field")])
def test_compare_refuses_a_bad_tuning_before_running_anything(tmp_path, monkeypatch, setting, expected):
    from finetune.compare import cli as compare

    commands = []
    monkeypatch.setattr(compare, "run_sweep", lambda command: commands.append(command) or 0)
    result = run_main("finetune.compare.cli", *TINY, "compare.strategies=[freeze,full]", "compare.tune.trials=2",
                      setting, f"hydra.run.dir={tmp_path}", cwd=tmp_path)
    assert result.returncode == 2 and expected in result.stderr and len(result.stderr.strip().splitlines()) == 1, \
        result.stderr[-2000:]
    assert not commands and not (tmp_path / "tune").exists(), "nothing run"


@pytest.mark.slow
def test_a_tuned_comparison_tests_only_its_final_runs(tmp_path, monkeypatch):
    """freeze tunes through the Optuna sweeper (test=false trials), cached through the head grid; the test split
    is evaluated exactly once per final run (strategies x seeds), never by a trial, and each final run trains at
    the configuration its tuning chose."""
    import lightning as L

    from finetune.compare import cli as compare

    tested = []
    real_test = L.Trainer.test

    def counting_test(self, *args, **kwargs):
        tested.append(Path(self.default_root_dir).name)
        return real_test(self, *args, **kwargs)

    def sweep_in_this_process(command: list[str]) -> int:
        words = [w for w in command[3:] if not w.startswith(("hydra/launcher=", "hydra.launcher."))]
        return run_main(command[2], *words, "hydra/launcher=basic", cwd=tmp_path).returncode

    monkeypatch.setattr(L.Trainer, "test", counting_test)
    monkeypatch.setattr(compare, "run_sweep", sweep_in_this_process)
    out = tmp_path / "out"
    result = run_main("finetune.compare.cli", *TINY, "trainer.max_epochs=2", "compare.strategies=[freeze,cached]",
                      "compare.seeds=[1,2]", "compare.tune.trials=3", f"paths.cache_dir={tmp_path / 'cache'}",
                      f"hydra.run.dir={out}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(tested) == ["cached_seed1", "cached_seed2", "freeze_seed1", "freeze_seed2"]
    records = tune.read_tunings(out)
    assert records["freeze"]["method"] == "optuna" and records["cached"]["method"] == "head_grid"
    for strategy, record in records.items():
        assert record["run"] == 3 and len(record["trials"]) == 3 and record["chosen"]
        best = max((t for t in record["trials"] if t["state"] == "COMPLETE"), key=lambda t: t["val_acc"])
        assert record["chosen"] == best["params"] and record["best_val_acc"] == best["val_acc"]
        for seed in (1, 2):  # the final runs trained at the chosen configuration
            run = OmegaConf.load(out / f"{strategy}_seed{seed}" / ".hydra" / "config.yaml")
            assert run.optimizer.lr == pytest.approx(record["chosen"]["optimizer.lr"])
            assert run.optimizer.weight_decay == pytest.approx(record["chosen"]["optimizer.weight_decay"])
            assert run.seed == seed
    for trial in records["freeze"]["trials"]:
        trial_dir = Path(trial["run_dir"])
        assert json.loads((trial_dir / "metrics.json").read_text())["tested"] is False
        assert not (trial_dir / "predictions.csv").exists()
        assert OmegaConf.load(trial_dir / ".hydra" / "config.yaml").seed == 0, "the tuning's own seed"
    report = (out / "comparison.md").read_text()
    assert "## Tuning" in report and "| freeze | optuna | 3 |" in report and (out / "tuning.png").exists()
    rows = {r["strategy"]: r for r in __import__("csv").DictReader(open(out / "comparison.csv"))}
    assert float(rows["freeze"]["cost_with_tuning_seconds"]) > float(rows["freeze"]["cost_seconds"])
    assert rows["freeze"]["tuned"].startswith("optimizer.lr=")
    # the same report, tuning included, from the finished folder
    again = run_main("finetune.compare.cli", f"from={out}", f"hydra.run.dir={tmp_path / 'report'}", cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "## Tuning" in (tmp_path / "report" / "comparison.md").read_text()
    assert (tmp_path / "report" / "tuning.png").exists()


def test_a_key_the_user_sets_is_pinned_not_tuned(tmp_path):
    plan = tune.plan_of("freeze", strategy_cfg(tmp_path, "freeze", "optimizer.lr=0.05"), ("optimizer.lr",))
    assert "optimizer.lr" not in plan.space and plan.pinned == {"optimizer.lr": "0.05"}
    assert list(plan.space) == ["optimizer.weight_decay"]


def test_the_configured_values_are_tried_first_and_staged_knobs_are_not_pruned_before_their_phase(tmp_path):
    freeze = tune.plan_of("freeze", strategy_cfg(tmp_path, "freeze"))
    assert freeze.configured == {"optimizer.lr": 0.01, "optimizer.weight_decay": 0.01} and freeze.warmup_epochs == 0
    command = tune.optuna_command(freeze, tune.Budget(4, None, 0, "median", 0), ["train"], {}, tmp_path, 1)
    assert "hydra.sweeper.enqueue=[{optimizer.lr:0.01,optimizer.weight_decay:0.01}]" in command
    assert "hydra.sweeper.pruner=median" in command
    command = tune.optuna_command(freeze, tune.Budget(4, None, 0, "median", 2), ["train"], {}, tmp_path, 1)
    assert "hydra.sweeper.pruner={_target_:optuna.pruners.MedianPruner,n_warmup_steps:2}" in command
    lp_ft = tune.plan_of("lp_ft", strategy_cfg(tmp_path, "lp_ft"))
    assert lp_ft.warmup_epochs == 10, "the fine-tuning lr acts from epoch 10 (after the 10 probe epochs)"
    command = tune.optuna_command(lp_ft, tune.Budget(4, None, 0, "median"), ["train"], {"strategy.probe_lr": 0.02},
                                  tmp_path, 1)
    assert "hydra.sweeper.pruner={_target_:optuna.pruners.MedianPruner,n_warmup_steps:10}" in command
    assert "strategy.probe_lr=0.02" in command and not any(w.startswith("strategy.probe_lr=tag") for w in command)
    assert tune.plan_of("gradual", strategy_cfg(tmp_path, "gradual")).warmup_epochs == 3
    # a probe on images is not a head on cached features: all of lp_ft tunes with Optuna then
    assert tune.plan_of("lp_ft", strategy_cfg(tmp_path, "lp_ft", "strategy.probe_on=images")).method == "optuna"


def test_the_extraction_the_tuning_paid_is_charged_once_to_every_cache_reader(tmp_path):
    """The head grid extracted train and val (8 s) during tuning, a final run the test split (2 s): every cache
    reader is charged 10 s, not the 2 s the final runs saw, nor 0."""
    from finetune.compare.decide import decide
    from finetune.compare.report import collect_runs

    generator = np.random.default_rng(1)
    for seed in (1, 2):
        correct = generator.random(300) < 0.9
        run = fake_run(tmp_path / f"cached_seed{seed}", "cached", seed, correct, 1.0, 100, val=0.9)
        run.update(extract_seconds=2.0 if seed == 1 else 0.0, cache_hit=seed != 1)
        (tmp_path / f"cached_seed{seed}" / "metrics.json").write_text(json.dumps(run))
        fake_run(tmp_path / f"full_seed{seed}", "full", seed, correct, 50.0, 10000, val=0.95)
    decision = decide(collect_runs(tmp_path), tuning_extract_seconds=8.0)
    assert decision["extraction_seconds"] == 10.0
    assert decision["strategies"]["cached"]["fit_cost_seconds"] == 11.0
    assert decide(collect_runs(tmp_path))["extraction_seconds"] == 2.0


def test_each_split_tunes_on_its_own_val_and_tests_its_own_choice(tmp_path, monkeypatch):
    """compare.splits=2: a split's val images are the other split's test images, so each split tunes apart (its
    data.split_seed in every tuning command) and its final runs train its own choice."""
    from finetune.compare import cli as compare

    commands = []

    def fake_tuning(plan, cfg, cached, budget, base, output_dir, jobs, run, folder):
        commands.append(base)
        record = {"strategy": plan.strategy, "method": "optuna", "chosen": {"optimizer.lr": 0.001 * (1 + cfg.data.split_seed)},
                  "trials": [], "run": 2, "pruned": 0, "failed": 0, "wall_seconds": 1.0, "device_seconds": 1.0,
                  "extract_seconds": 0.0, "trials_budget": 2, "seed": 0, "best_val_acc": 0.5}
        record["overrides"] = [f"{k}={v}" for k, v in record["chosen"].items()]
        path = output_dir / "tune" / folder
        path.mkdir(parents=True)
        (path / "tuning.json").write_text(json.dumps(record | {"split_seed": cfg.data.split_seed}))
        return record

    sweeps = []
    monkeypatch.setattr(tune, "tune_strategy", fake_tuning)
    monkeypatch.setattr(compare, "run_sweep", lambda command: sweeps.append(command) or 1)
    result = run_main("finetune.compare.cli", *TINY, "compare.strategies=[freeze]", "compare.seeds=[1,2]",
                      "compare.splits=2", "data.split_seed=5", "compare.tune.trials=2", f"hydra.run.dir={tmp_path}",
                      cwd=tmp_path)
    assert "every run failed" in result.stderr  # nothing trained here
    assert [c[-1] for c in commands] == ["data.split_seed=5", "data.split_seed=6"]
    finals = [[w for w in c if w.startswith(("data.split_seed=", "optimizer.lr=", "hydra.sweep.subdir="))]
              for c in sweeps]
    assert finals == [["data.split_seed=5", "optimizer.lr=0.006",
                       "hydra.sweep.subdir=${hydra.runtime.choices.strategy}_split${data.split_seed}_seed${seed}"],
                      ["data.split_seed=6", "optimizer.lr=0.007",
                       "hydra.sweep.subdir=${hydra.runtime.choices.strategy}_split${data.split_seed}_seed${seed}"]]
    merged = tune.read_tunings(tmp_path)["freeze"]
    assert merged["device_seconds"] == 2.0 and [r["split_seed"] for r in merged["per_split"]] == [5, 6]
