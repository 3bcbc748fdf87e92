"""The figures of docs/search.md: pruning against no pruner, two workers on one journal file against one, and a
kill -9 then resume. Runs finetune-train processes; prints markdown tables. Usage: python scripts/measure_search.py
OUT_DIR [--trials 6 --epochs 3]"""

from __future__ import annotations

import argparse
import collections
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna

from finetune.search.pruning import open_storage

optuna.logging.set_verbosity(optuna.logging.WARNING)
# the tiny timm model at 32 px on digits: the mechanics of the search, in minutes on two CPU cores
SMALL = ["backbone=timm", "backbone.name=test_efficientnet", "backbone.pretrained=false", "data.image_size=32",
         "trainer.accelerator=cpu", "trainer.enable_progress_bar=false", "~callbacks.progress_bar",
         "trainer.enable_model_summary=false"]


def command(out: Path, name: str, *overrides: str) -> list[str]:
    return ["finetune-train", "-m", "hparams_search=full_optuna", *SMALL, *overrides,
            f"hydra.sweep.dir={out / name}"]


def trials(storage: Path):
    (summary,) = optuna.get_all_study_summaries(open_storage(str(storage)))
    return optuna.load_study(study_name=summary.study_name, storage=open_storage(str(storage))).get_trials()


def states(storage: Path) -> str:
    counts = collections.Counter(t.state.name + ("(dead worker)" if t.user_attrs.get("stale") else "")
                                 for t in trials(storage))
    return ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))


def run(cmd: list[str], log: Path) -> float:
    start = time.time()
    with open(log, "w") as handle:
        subprocess.run(cmd, stdout=handle, stderr=subprocess.STDOUT, check=True)
    return time.time() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--trials", type=int, default=6)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    print("| pruner | trials | epochs trained | wall (s) | best val/acc | states |\n|---|---|---|---|---|---|")
    for pruner in ("none", "{_target_:optuna.pruners.MedianPruner,n_startup_trials:2}"):
        name = "prune_none" if pruner == "none" else "prune_median"
        cmd = command(out, name, f"hydra.sweeper.pruner={pruner}", f"hydra.sweeper.n_trials={args.trials}",
                      f"trainer.max_epochs={args.epochs}")
        wall = run(cmd, out / f"{name}.log")
        done = trials(out / name / "optuna.journal")
        best = max(t.value for t in done if t.value is not None)
        print(f"| {'median (2 startup)' if name == 'prune_median' else 'none'} | {len(done)} | "
              f"{sum(len(t.intermediate_values) for t in done)} | {wall:.0f} | {best:.4f} | "
              f"{states(out / name / 'optuna.journal')} |", flush=True)
    print("\n| workers | trials | wall (s) | finished trials per hour |\n|---|---|---|---|")
    for workers in (1, 2):
        storage = out / f"workers{workers}.journal"
        start = time.time()
        procs = [subprocess.Popen(command(out, f"workers{workers}_{i}", f"hydra.sweeper.storage={storage}",
                                          "hydra.sweeper.n_trials=4", "trainer.max_epochs=2",
                                          "hydra.sweeper.pruner=none", f"hydra.sweeper.sampler.seed={i}"),
                                  stdout=open(out / f"workers{workers}_{i}.log", "w"), stderr=subprocess.STDOUT)
                 for i in range(workers)]
        assert all(p.wait() == 0 for p in procs)
        wall = time.time() - start
        print(f"| {workers} | {len(trials(storage))} | {wall:.0f} | {4 / wall * 3600:.0f} |", flush=True)
    storage = out / "killed.journal"
    victim = subprocess.Popen(command(out, "killed", f"hydra.sweeper.storage={storage}", "hydra.sweeper.n_trials=4",
                                      "trainer.max_epochs=6", "hydra.sweeper.pruner=none"),
                              stdout=open(out / "killed.log", "w"), stderr=subprocess.STDOUT)
    while not (storage.exists() and storage.stat().st_size and "COMPLETE" in states(storage)
               and "RUNNING" in states(storage)):
        time.sleep(0.5)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    print(f"\n| moment | trials in the study |\n|---|---|\n| after kill -9 | {states(storage)} |")
    run(command(out, "killed", f"hydra.sweeper.storage={storage}", "hydra.sweeper.n_trials=4",
                "trainer.max_epochs=6", "hydra.sweeper.pruner=none"), out / "resumed.log")
    retried = [t.user_attrs["retry_of"] for t in trials(storage) if "retry_of" in t.user_attrs]
    print(f"| after the same command again | {states(storage)}; re-asked: trial {retried} |")


if __name__ == "__main__":
    sys.exit(main())
