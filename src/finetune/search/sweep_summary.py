"""The Hydra callback at the end of every `finetune-train -m` sweep (configs/hydra/default.yaml)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from hydra.experimental.callback import Callback

from finetune.run import folders

log = logging.getLogger("finetune")


class SweepSummary(Callback):
    """Hydra callback: at the end of a multirun, list the jobs that failed (from their failure.json) and exit 1. A
    hyperparameter search instead writes and prints its best trial (best.json); failed trials are part of a search."""

    def on_multirun_end(self, config, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if (sweep_dir / "optimization_results.yaml").exists():
            from finetune.search.best import describe, summarise_search

            summary = summarise_search(sweep_dir, config.get("optimized_metric") or "val/acc",
                                       str(config.hydra.sweeper.get("direction", "maximize")))
            print(describe(summary, sweep_dir))
            return
        jobs = folders.job_dirs(sweep_dir, nested=True)
        # by file, not by job: a job killed before Hydra wrote its .hydra/ has only the launcher's failure.json
        failures = [folders.failure(p.parent) | {"dir": str(p.parent)}
                    for p in sorted(sweep_dir.glob(f"**/{folders.FAILURE_FILE}"))]
        if not failures:
            return
        lines = [f"{len(failures)} of {len(jobs)} jobs failed (the others finished; see each failure.json):"]
        lines += [f"  job {f.get('job')} [{' '.join(f.get('overrides', []))}]: {f['error']}  ({f['dir']})"
                  for f in failures]
        print("\n".join(lines), file=sys.stderr)
        log.error("\n".join(lines))
        sys.exit(1)
