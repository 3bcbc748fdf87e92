"""hparams_search=head_optuna: our Optuna sweeper (hydra/sweeper=optuna) tunes the head on cached features. The features are extracted
by the first trial only, a diverging trial is told to Optuna as failed while the study goes on, and the best trial
is written to best.json and printed."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time

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


def test_the_wall_clock_cap_stops_only_trials_still_to_be_asked():
    """hydra.sweeper.timeout denies new trials; one that passes while the last trials are in flight cut nothing short
    (finetune-compare's tuning once reported a study of all 12 trials as "stopped by compare.tune.max_minutes")."""
    from hydra_plugins.finetune_optuna_sweeper.optuna_sweeper import OptunaSweeper

    sweeper = OptunaSweeper(sampler=None, direction="maximize", storage=None, study_name=None, n_trials=12, n_jobs=2,
                            max_failure_rate=0.0, search_space=None, custom_search_space=None, params=None,
                            timeout=60)
    sweeper._deadline = math.inf  # before the deadline
    assert [sweeper._slot_action(f, r) for f, r in [(3, 2), (10, 2), (11, 1), (12, 0)]] == ["ask", "wait", "wait",
                                                                                         "done"]
    sweeper._deadline = -math.inf  # after it
    assert [sweeper._slot_action(f, r) for f, r in [(3, 2), (10, 1), (10, 2), (12, 0)]] == ["stop", "stop", "wait",
                                                                                         "done"]


def test_a_trial_just_asked_by_another_live_worker_is_not_failed_as_dead(tmp_path):
    """Unit: the dead-worker check. Two workers started together once raced: one read the other's new trial between
    its two attribute writes (a worker, no heartbeat yet), took it for silent since 1970 and failed it, and the
    asking worker's slot died on its next write. A trial asked moments ago by a live worker stays RUNNING, whatever
    the order of its attributes; one of a process that is gone is failed and asked again."""
    import socket

    import optuna

    from finetune.search.pruning import open_storage
    from hydra_plugins.finetune_optuna_sweeper.optuna_sweeper import HEARTBEAT_ATTR, WORKER_ATTR, OptunaSweeper

    study = optuna.create_study(study_name="race", storage=open_storage(str(tmp_path / "study.journal")))
    sweeper = OptunaSweeper(sampler=None, direction="maximize", storage=None, study_name=None, n_trials=5, n_jobs=1,
                            max_failure_rate=0.0, search_space=None, custom_search_space=None, params=None)
    sweeper.study = study
    here = f"{socket.gethostname()}:{os.getpid()}"
    half_written = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    half_written.set_user_attr(WORKER_ATTR, here)  # the older order, caught between its two writes
    new_order = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    new_order.set_user_attr(HEARTBEAT_ATTR, time.time())  # caught between the two writes: no worker yet
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    orphan = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    orphan.set_user_attr(HEARTBEAT_ATTR, time.time())
    orphan.set_user_attr(WORKER_ATTR, f"{socket.gethostname()}:{gone.pid}")
    sweeper._fail_dead_trials()
    states = {t.number: t.state.name for t in study.get_trials(deepcopy=False)}
    assert states[half_written.number] == states[new_order.number] == "RUNNING"
    assert states[orphan.number] == "FAIL" and states[3] == "WAITING", "the dead worker's trial is asked again"


# -- hydra/sweeper=optuna: pruning, options, bad input, shared and resumed studies ---------------------------------

FULL = ["hparams_search=full_optuna", *[o for o in TINY if not o.startswith("trainer.max_epochs")],
        "+trainer.limit_train_batches=2", "+trainer.limit_val_batches=1", "+trainer.limit_test_batches=1"]


def study_trials(storage):
    """Every trial of the one study in a journal file, as Optuna sees it."""
    import optuna
    from finetune.search.pruning import open_storage

    storage = open_storage(str(storage))
    (summary,) = optuna.get_all_study_summaries(storage)
    return optuna.load_study(study_name=summary.study_name, storage=storage).get_trials()


def counted(trials):
    from hydra_plugins.finetune_optuna_sweeper.optuna_sweeper import counts_toward_n_trials

    return [t for t in trials if counts_toward_n_trials(t)]


def test_a_trial_whose_val_is_worse_is_pruned_after_its_first_report_and_ends_cleanly(tmp_path):
    """Unit: one trial. The first trial trains (lr 3e-2) and sets the median; the second (lr 1e-12: val/loss stays at
    its start) is pruned by its first report, at epoch 0 of 3: its folder says so, it is PRUNED, not failed."""
    storage = tmp_path / "study.journal"
    common = [*FULL, "trainer.max_epochs=3", "optimized_metric=val/loss", "hydra.sweeper.direction=minimize",
              f"hydra.sweeper.storage={storage}",
              "hydra.sweeper.pruner={_target_:optuna.pruners.MedianPruner,n_startup_trials:1}"]
    first = run_main("finetune.train", "-m", *common, "optimizer.lr=3e-2", "hydra.sweeper.n_trials=1",
                     f"hydra.sweep.dir={tmp_path / 'a'}", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    second = run_main("finetune.train", "-m", *common, "optimizer.lr=1e-12", "hydra.sweeper.n_trials=2",
                      f"hydra.sweep.dir={tmp_path / 'b'}", cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    good, bad = study_trials(storage)
    assert good.state.name == "COMPLETE" and len(good.intermediate_values) == 3
    assert bad.state.name == "PRUNED" and list(bad.intermediate_values) == [0]
    assert bad.user_attrs["pruned_at_epoch"] == 0
    run = tmp_path / "b" / "1"
    assert json.loads((run / "pruned.json").read_text())["epoch"] == 0
    assert not (run / "failure.json").exists() and (run / "metrics.json").exists()
    best = json.loads((tmp_path / "b" / "best.json").read_text())
    assert [p["job"] for p in best["pruned"]] == ["1"] and best["failed"] == []
    assert best["best_run"] == str((tmp_path / "a" / "0").resolve()), "the best trial ran in the other sweep folder"
    assert "1 trial(s) pruned: job 1 after epoch 0" in second.stdout


@pytest.mark.parametrize("option", ["hydra.sweeper.pruner=median", "hydra.sweeper.pruner=hyperband",
                                    "hydra.sweeper.pruner=successive_halving", "hydra.sweeper.pruner=none",
                                    "hydra/sweeper/sampler=tpe", "hydra/sweeper/sampler=random",
                                    "hydra/sweeper/sampler=cmaes", "hydra/sweeper/sampler=nsgaii",
                                    "hydra/sweeper/sampler=qmc"])
def test_every_pruner_and_sampler_runs_a_trial_that_trains(tmp_path, option):
    """Unit: one option, one trial of one epoch; the trial reported to the study and completed."""
    result = run_main("finetune.train", "-m", *FULL, "trainer.max_epochs=1", "hydra.sweeper.n_trials=1", option,
                      f"hydra.sweep.dir={tmp_path / 's'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (trial,) = study_trials(tmp_path / "s" / "optuna.journal")
    assert trial.state.name == "COMPLETE" and list(trial.intermediate_values) == [0]
    assert json.loads((tmp_path / "s" / "0" / "metrics.json").read_text())["strategy"] == "full"
    assert "resume it, or add a worker:" in result.stdout


def test_the_official_sweeper_class_name_runs_our_sweeper(tmp_path):
    """A lightning-hydra-template YAML names the official class; it resolves to ours."""
    result = run_main("finetune.train", "-m", *FULL, "trainer.max_epochs=1", "hydra.sweeper.n_trials=1",
                      "hydra.sweeper._target_=hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper",
                      f"hydra.sweep.dir={tmp_path / 's'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(study_trials(tmp_path / "s" / "optuna.journal")) == 1


def bad_inputs(tmp_path):
    existing = tmp_path / "existing.journal"
    return {
        "hydra.sweeper.pruner=medain": "hydra.sweeper.pruner='medain'; choose one of: median, hyperband, "
                                       "successive_halving, none",
        "hydra.sweeper.sampler._target_=optuna.samplers.TPESampl": "hydra.sweeper.sampler._target_="
                                                                   "optuna.samplers.TPESampl; choose one of:",
        f"hydra.sweeper.storage={tmp_path / 'missing' / 'study.journal'}": f"the folder {tmp_path / 'missing'} "
                                                                           f"does not exist",
        "hydra.sweeper.n_trials=0": "hydra.sweeper.n_trials=0; it must be at least 1",
        f"hydra.sweeper.storage={existing}": f"hydra.sweeper.direction=maximize, but study 'full_lr_search' in "
                                             f"{existing} was created to minimize",
    }


def test_bad_sweeper_settings_are_one_line_exit_2_and_leave_the_study_untouched(tmp_path):
    """Unit: one bad setting each; nothing trains, the existing study's journal keeps its bytes."""
    import optuna
    from finetune.search.pruning import open_storage

    existing = tmp_path / "existing.journal"
    study = optuna.create_study(study_name="full_lr_search", storage=open_storage(str(existing)))
    study.tell(study.ask(), 0.5)
    before = existing.read_bytes()
    for override, message in bad_inputs(tmp_path).items():
        result = run_main("finetune.train", "-m", *FULL, override, f"hydra.sweep.dir={tmp_path / 's'}", cwd=tmp_path)
        assert result.returncode == 2, (override, result.stderr[-2000:])
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (override, lines)
        assert not list((tmp_path / "s").glob("*/metrics.json"))
    assert existing.read_bytes() == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into any folder")
def test_an_unwritable_storage_folder_is_one_line_exit_2(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir(mode=0o500)
    result = run_main("finetune.train", "-m", *FULL, f"hydra.sweeper.storage={folder / 'study.journal'}",
                      f"hydra.sweep.dir={tmp_path / 's'}", cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.strip() == (
        f"error: hydra.sweeper.storage={folder / 'study.journal'}: {folder} is not writable")


def worker(tmp_path, name: str, storage, *extra: str):
    from tests.test_cli import start_cli

    return start_cli("finetune.train", "-m", *FULL, f"hydra.sweeper.storage={storage}",
                     f"hydra.sweep.dir={tmp_path / name}", *extra, cwd=tmp_path, log=tmp_path / f"{name}.log")


@pytest.mark.slow
def test_two_worker_processes_on_one_journal_file_finish_exactly_n_trials(tmp_path):
    """Unit: the study. Two processes (own sampler seeds) share it and stop when it holds 5 finished trials."""
    storage = tmp_path / "study.journal"
    workers = [worker(tmp_path, f"w{i}", storage, "trainer.max_epochs=2", "hydra.sweeper.n_trials=5",
                      f"hydra.sweeper.sampler.seed={i}") for i in range(2)]
    for process in workers:
        assert process.wait(timeout=600) == 0
    trials = study_trials(storage)
    assert len(counted(trials)) == 5 and all(t.state.name == "COMPLETE" for t in counted(trials))
    assert not [t for t in trials if t.state.name in ("RUNNING", "WAITING")]
    ran = [p.parent.name for p in tmp_path.glob("w*/*/metrics.json")]  # a run folder is named after its trial
    assert len(ran) == 5 and len(set(ran)) == 5, "each trial ran once, in one of the workers"
    assert {p.parent.parent.name for p in tmp_path.glob("w*/*/metrics.json")} == {"w0", "w1"}, "both workers ran trials"


@pytest.mark.slow
def test_a_search_killed_mid_trial_resumes_keeping_finished_trials_and_re_asking_the_dead_one(tmp_path):
    """Unit: the study. SIGKILL of the worker while its second trial runs; the second invocation fails that RUNNING
    trial, asks its parameters again, and the study ends with 3 finished trials, the first one not rerun."""
    import signal
    import time

    storage = tmp_path / "study.journal"
    # 6 epochs a trial: the first finishes soon; the kill lands while the second or, should polling miss it, the third
    # runs (12 epochs of window, polled every half second)
    first = worker(tmp_path, "w", storage, "trainer.max_epochs=6", "hydra.sweeper.n_trials=3")
    deadline = time.time() + 300
    while time.time() < deadline:
        trials = study_trials(storage) if storage.exists() and storage.stat().st_size else []
        if any(t.state.name == "COMPLETE" for t in trials) and any(t.state.name == "RUNNING" for t in trials):
            break
        time.sleep(0.5)
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    before = study_trials(storage)
    dead = next(t for t in before if t.state.name == "RUNNING")
    done = [t.number for t in before if t.state.name == "COMPLETE"]
    result = run_main("finetune.train", "-m", *FULL, f"hydra.sweeper.storage={storage}", "trainer.max_epochs=1",
                      "hydra.sweeper.n_trials=3", f"hydra.sweep.dir={tmp_path / 'w'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    after = study_trials(storage)
    assert after[dead.number].state.name == "FAIL" and after[dead.number].user_attrs["stale"] is True
    retry = next(t for t in after if t.user_attrs.get("retry_of") == dead.number)
    assert retry.state.name == "COMPLETE" and retry.params == dead.params
    assert [t.number for t in after[:len(done) + 1] if t.state.name == "COMPLETE"] == done, "finished trials kept"
    assert len(counted(after)) == 3 and not [t for t in after if t.state.name == "RUNNING"]


@pytest.mark.slow
def test_local_processes_keeps_two_trials_in_flight_and_hands_back_each_value(tmp_path):
    """Unit: the trial. Before, a search through local_processes told Optuna the exit code (0) as the value."""
    result = run_main("finetune.train", "-m", *FULL, "trainer.max_epochs=1", "hydra.sweeper.n_trials=2",
                      "hydra.sweeper.n_jobs=2", "hydra/launcher=local_processes", "hydra.launcher.jobs=1",
                      f"hydra.sweep.dir={tmp_path / 's'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    trials = study_trials(tmp_path / "s" / "optuna.journal")
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"]
    for trial in trials:
        metrics = json.loads((tmp_path / "s" / str(trial.number) / "metrics.json").read_text())
        assert trial.value == pytest.approx(metrics["best_val_acc"])
    starts = sorted(t.datetime_start for t in trials)
    ends = sorted(t.datetime_complete for t in trials)
    assert starts[1] < ends[0], "the second trial started before the first ended"
