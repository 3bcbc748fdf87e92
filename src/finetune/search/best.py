"""The end of a hyperparameter search: which trial won, with what score and parameters, and which trials failed.

The Optuna sweeper (hydra/sweeper=optuna) writes optimization_results.yaml (best_params, best_value, the best run's
folder, where the study lives and how to resume it) into the sweep folder; this adds best.json beside it with the
winning trial's run folder and metrics, the failed trials with their reasons and the pruned ones. With workers
sharing a study, the best trial may have run in another worker's sweep folder: its folder comes from the study.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from finetune.run import folders


def summarise_search(sweep_dir: Path, optimized_metric: str, direction: str) -> dict:
    """best.json's content, written into `sweep_dir`; needs the sweeper's optimization_results.yaml."""
    results = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    best_params = results["best_params"]
    wanted = {f"{name}={value}" for name, value in best_params.items()}
    trials, failed, pruned = folders.job_dirs(sweep_dir), [], []
    best_dir = Path(results["best_run"]) if results.get("best_run") else None
    for job in trials:
        if folders.pruned(job) is not None:
            pruned.append({"job": job.name} | folders.pruned(job))
        failure = folders.failure(job)
        if failure is not None:
            tried = [o for o in folders.overrides(job) if o.split("=", 1)[0] in best_params]  # this trial's parameters
            failed.append({"job": job.name, "params": tried, "error": failure["error"]})
        elif best_dir is None and wanted <= set(folders.overrides(job)):
            best_dir = job
    best_metrics = (folders.metrics(best_dir) if best_dir else None) or {}
    summary = {"optimized_metric": optimized_metric, "direction": direction, "best_value": results["best_value"],
               "best_params": best_params, "best_run": str(best_dir) if best_dir else None,
               "best_val_acc": best_metrics.get("best_val_acc"), "best_test_acc": best_metrics.get("test_acc"),
               "best_checkpoint": best_metrics.get("best_checkpoint"), "trials": len(trials),
               "failed": failed, "pruned": pruned,
               "study": {key: results.get(key) for key in ("study_name", "storage", "finished", "states", "resume")}}
    (sweep_dir / "best.json").write_text(json.dumps(summary, indent=1))
    return summary


def describe(summary: dict, sweep_dir: Path) -> str:
    params = " ".join(f"{name}={value}" for name, value in summary["best_params"].items())
    best_value = float("nan") if summary["best_value"] is None else summary["best_value"]
    lines = [f"best of {summary['trials']} trials: {summary['optimized_metric']}={best_value:.4f} "
             f"(test acc {summary['best_test_acc'] or float('nan'):.4f}) with {params}",
             f"  run: {summary['best_run']}", f"  written to {sweep_dir / 'best.json'}"]
    if summary.get("pruned"):
        lines.append(f"{len(summary['pruned'])} trial(s) pruned: " + ", ".join(
            f"job {p['job']} after epoch {p['epoch']}" for p in summary["pruned"]))
    if summary["failed"]:
        lines.append(f"{len(summary['failed'])} trial(s) failed and were told to Optuna as failed:")
        lines += [f"  job {f['job']} [{' '.join(f['params'])}]: {f['error']}" for f in summary["failed"]]
    return "\n".join(lines)
