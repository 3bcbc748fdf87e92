"""hparams_search=head_optuna: our Optuna sweeper (hydra/sweeper=optuna) tunes the head on cached features. The features are extracted
by the first trial only, a diverging trial is told to Optuna as failed while the study goes on, and the best trial
is written to best.json and printed."""

from __future__ import annotations

import json

import pytest
import yaml

from tests.conftest import TINY
from tests.test_cli import run_main

pytest.importorskip("optuna")
TRIALS = 5


def test_a_search_extracts_once_records_the_diverged_trial_and_writes_the_best(tmp_path):
    sweep_dir = tmp_path / "search"
    # lr 1e30 makes the head's logits overflow: NonFiniteLossGuard stops that trial
    tiny = [o for o in TINY if not o.startswith("trainer.max_epochs")]
    result = run_main("finetune.train", "-m", "hparams_search=head_optuna", *tiny, f"hydra.sweeper.n_trials={TRIALS}",
                      "hydra.sweeper.sampler.n_startup_trials=5", "optimizer.lr=choice(1e30,3e-2,1e-2)",
                      "trainer.max_epochs=choice(1,2)", f"paths.cache_dir={tmp_path / 'cache'}",
                      f"hydra.sweep.dir={sweep_dir}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = sorted((p for p in sweep_dir.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
    assert len(jobs) == TRIALS
    finished = {job.name: json.loads((job / "metrics.json").read_text()) for job in jobs
                if (job / "metrics.json").exists()}
    failed = [job.name for job in jobs if (job / "failure.json").exists()]
    assert failed and len(finished) + len(failed) == TRIALS, "the sampler drew lr=1e30 at least once (seeded)"
    for name in failed:
        assert "optimizer.lr=1e+30" in yaml.safe_load((sweep_dir / name / ".hydra" / "overrides.yaml").read_text())
        assert "training loss became" in json.loads((sweep_dir / name / "failure.json").read_text())["error"]
    assert "Failed experiment: Return value must be float-castable. Got 'None'" in result.stdout + result.stderr
    # one extraction, by the first trial (also when it then diverged): every later trial read the cache
    hits = [finished[name]["cache_hit"] for name in sorted(finished, key=int)]
    assert hits == [False] * ("0" in finished) + [True] * (len(finished) - ("0" in finished))
    best = json.loads((sweep_dir / "best.json").read_text())
    top = max(finished.values(), key=lambda m: m["best_val_acc"])
    assert best["best_value"] == pytest.approx(top["best_val_acc"]) and best["optimized_metric"] == "val/acc"
    assert best["best_val_acc"] == pytest.approx(top["best_val_acc"])
    assert set(best["best_params"]) == {"optimizer.lr", "optimizer.weight_decay", "head", "head.dropout",
                                        "trainer.max_epochs"}
    assert [f["job"] for f in best["failed"]] == failed and best["trials"] == TRIALS
    assert f"best of {TRIALS} trials: val/acc=" in result.stdout and str(sweep_dir / "best.json") in result.stdout


def test_an_unknown_optimized_metric_is_refused_before_training(tmp_path):
    result = run_main("finetune.train", *TINY, "optimized_metric=val/f1", f"hydra.run.dir={tmp_path}", cwd=tmp_path)
    assert result.returncode == 2
    assert "optimized_metric='val/f1'; choose one of: val/acc, val/loss, test/acc, test/loss" in result.stderr


def test_a_search_without_the_sweeper_installed_names_the_extra(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "optuna" else real(name, *args))
    result = run_main("finetune.train", "-m", "hparams_search=head_optuna", f"hydra.sweep.dir={tmp_path}", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == ("error: hparams_search=head_optuna needs optuna, which is not installed: "
                                     "pip install 'finetune[search]'")
