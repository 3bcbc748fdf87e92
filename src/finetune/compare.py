"""finetune-compare: every strategy on one backbone and dataset, same seed and epochs; a table and a figure.

`finetune-compare backbone=timm backbone.name=resnet18 data=image_folder data.root=...` applies the overrides to
every strategy; `finetune-compare from=logs/train/multiruns/<time>` builds the report from a finished sweep.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from finetune.config import CONFIG_DIR, report_user_errors
from finetune.errors import ConfigError
from finetune.report import collect_runs, format_text, succeeded, write_report

log = logging.getLogger("finetune")
OWN_KEYS = ("from", "hydra.", "compare.", "strategy=", "task_name")


def available_strategies() -> list[str]:
    """Every strategy config Hydra can see: the package's and those on the user's hydra.searchpath."""
    from hydra.core.global_hydra import GlobalHydra

    return sorted(GlobalHydra.instance().config_loader().get_group_options("strategy"))


def run_strategies(strategies: list[str], overrides: list[str], output_dir: Path, jobs: int = 1) -> list[str]:
    """`finetune-train strategy=X <overrides>` per strategy, each in its own process so that its peak memory and
    timings are its own; `jobs` at a time (more than one shares the machine, so timings are then not comparable).
    Returns the strategies that failed; the others still make the report."""
    failed, pending, running = [], list(strategies), []
    while pending or running:
        while pending and len(running) < max(int(jobs), 1):
            strategy = pending.pop(0)
            run_dir = output_dir / strategy
            log.info("compare: training strategy=%s into %s", strategy, run_dir)
            command = [sys.executable, "-m", "finetune.train", *overrides, f"strategy={strategy}",
                       f"hydra.run.dir={run_dir}"]
            running.append((strategy, subprocess.Popen(command)))
        # the next to start takes the place of whichever finished first, not of the oldest
        while not (done := [job for job in running if job[1].poll() is not None]):
            time.sleep(0.2)
        for strategy, process in done:
            running.remove((strategy, process))
            if process.returncode != 0:
                log.error("compare: strategy=%s failed; see %s", strategy, output_dir / strategy / "train.log")
                failed.append(strategy)
    return failed


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="compare")
@report_user_errors
def main(cfg: DictConfig) -> None:
    output_dir = Path(HydraConfig.get().runtime.output_dir)
    source = cfg.get("from")
    if source:
        if not Path(source).is_dir():
            raise ConfigError(f"from={source} is not a folder (expected a multirun or compare output folder)")
        rows = collect_runs(source)
        if not succeeded(rows):
            raise ConfigError(f"from={source} holds no <run>/metrics.json"
                              + (f" ({len(rows)} failed runs)" if rows else ""))
    else:
        available = available_strategies()
        strategies = list(cfg.compare.strategies or available)
        unknown = [s for s in strategies if s not in available]
        if unknown:
            raise ConfigError(f"compare.strategies has {unknown}; choose from: {', '.join(available)}")
        task_overrides = [o for o in HydraConfig.get().overrides.task if not o.lstrip("+~").startswith(OWN_KEYS)]
        hydra_overrides = [o for o in HydraConfig.get().overrides.hydra if o.startswith("hydra.searchpath")]
        failed = run_strategies(strategies, [*task_overrides, *hydra_overrides], output_dir,
                                cfg.compare.get("jobs", 1))
        rows = collect_runs(output_dir)
        if not succeeded(rows):
            raise ConfigError(f"every strategy failed ({', '.join(failed)}); see the train.log files under {output_dir}")
    paths = write_report(rows, output_dir, title=cfg.compare.title)
    print(format_text(rows))
    unreported = [s for s in ([] if source else failed) if s not in {r["strategy"] for r in rows if r.get("failed")}]
    if unreported:  # died without writing failure.json (killed, out of memory)
        print(f"failed: {', '.join(unreported)} (see their train.log)")
    print(f"report: {paths['md']}, {paths['csv']}, {paths['png']}")


if __name__ == "__main__":
    main()
