"""hydra/launcher=local_processes: every job of a sweep in its own Python process, `jobs` at a time, each given one
GPU of the node (CUDA_VISIBLE_DEVICES) when there are GPUs. finetune-compare's default launcher: a process per run
keeps each run's timings and peak memory its own; `jobs=<number of GPUs>` spreads a comparison over a node. For a
cluster, `hydra/launcher=slurm` (submitit) takes its place with no other change.

A job returns what its task function returned (the job writes it to job_return.json in its folder), so an Optuna
sweeper through this launcher reads each trial's metric. A job that fails returns None, as the in-process launcher's
jobs do (finetune.run.failures), and the others go on: its folder holds failure.json (written here for a job that died
without one), from which the sweep's summary lists it.
"""

# no `from __future__ import annotations`: Hydra executes plugin modules outside sys.modules, where dataclasses
# cannot resolve string annotations
import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict

from finetune.run.failures import FAILURE_FILE, JOB_RETURN_ENV

log = logging.getLogger(__name__)


@dataclass
class LocalProcessesConf:
    _target_: str = "hydra_plugins.finetune_launcher.local_processes.LocalProcessesLauncher"
    # the module each job runs as `python -m <module> <overrides>`
    module: str = "finetune.train"
    # jobs at once; above 1 without a GPU each, they share the CPU and their timings are not comparable
    jobs: int = 1
    # GPUs to hand out, one per running job: null = every visible one (none on a CPU machine)
    gpus: Optional[list] = None


ConfigStore.instance().store(group="hydra/launcher", name="local_processes", node=LocalProcessesConf,
                             provider="finetune")


def visible_gpus() -> List[str]:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [gpu for gpu in visible.split(",") if gpu.strip()]
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    except ImportError:
        return []


JOB_RETURN_FILE = "job_return.json"


def job_return_value(idx: int, overrides: List[str], run_dir: Path, exit_code: int):
    """What the job's task function returned; None for a failed job, which the sweep's summary then lists from its
    failure.json (written here, naming the exit code, when the job died before it could write one)."""
    if exit_code == 0:
        written = run_dir / JOB_RETURN_FILE
        return json.loads(written.read_text())["return_value"] if written.exists() else None
    log.error("#%d failed (exit %d): see %s", idx, exit_code, run_dir)
    failure = run_dir / FAILURE_FILE
    if not failure.exists():
        failure.write_text(json.dumps({"error": f"the job exited with {exit_code} without a failure record (killed, "
                                                f"out of memory?); see its log", "job": idx,
                                       "overrides": list(overrides)}, indent=1))
    return None


class LocalProcessesLauncher(Launcher):
    def __init__(self, module: str = "finetune.train", jobs: int = 1, gpus: Optional[list] = None) -> None:
        super().__init__()
        self.module, self.jobs = module, max(int(jobs), 1)
        self.gpus = [str(gpu) for gpu in gpus] if gpus is not None else None
        self.config: Optional[DictConfig] = None
        self.hydra_context: Optional[HydraContext] = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context = config, hydra_context

    def _command(self, overrides: Sequence[str], run_dir: Path, idx: int) -> List[str]:
        from finetune.config import config_dir_flags

        searchpath = [o for o in self.config.hydra.overrides.hydra if o.startswith("hydra.searchpath")]
        return [sys.executable, "-m", self.module, *config_dir_flags(self.config.hydra), *overrides, *searchpath,
                f"hydra.run.dir={run_dir}", f"hydra.job.num={idx}"]

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        assert self.config is not None and self.hydra_context is not None
        gpus = self.gpus if self.gpus is not None else visible_gpus()
        slots = max(min(self.jobs, len(gpus)) if gpus else self.jobs, 1)
        log.info("launching %d jobs, %d at a time%s", len(job_overrides), slots,
                 f", one GPU each of {', '.join(gpus)}" if gpus else "")
        pending = list(enumerate(job_overrides, start=initial_job_idx))
        running: Dict[int, tuple] = {}  # slot -> (idx, overrides, sweep config, run dir, process)
        results: Dict[int, JobReturn] = {}
        while pending or running:
            for slot in range(slots):
                if slot in running or not pending:
                    continue
                idx, overrides = pending.pop(0)
                sweep_config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
                with open_dict(sweep_config):
                    sweep_config.hydra.job.id = sweep_config.hydra.job.num = idx
                HydraConfig.instance().set_config(sweep_config)  # for ${hydra:...} in the sweep's subdir
                run_dir = Path(str(sweep_config.hydra.sweep.dir)) / str(sweep_config.hydra.sweep.subdir)
                run_dir.mkdir(parents=True, exist_ok=True)
                env = dict(os.environ, **{JOB_RETURN_ENV: str(run_dir / JOB_RETURN_FILE)})
                (run_dir / JOB_RETURN_FILE).unlink(missing_ok=True)
                if gpus:
                    env["CUDA_VISIBLE_DEVICES"] = gpus[slot % len(gpus)]
                log.info("#%d%s: %s -> %s", idx, f" (GPU {env['CUDA_VISIBLE_DEVICES']})" if gpus else "",
                         " ".join(filter_overrides(overrides)), run_dir)
                process = subprocess.Popen(self._command(overrides, run_dir, idx), env=env)
                running[slot] = (idx, list(overrides), sweep_config, run_dir, process)
            finished = [slot for slot, job in running.items() if job[4].poll() is not None]
            if not finished:
                time.sleep(0.2)
            for slot in finished:
                idx, overrides, sweep_config, run_dir, process = running.pop(slot)
                task_config = OmegaConf.masked_copy(sweep_config, [k for k in sweep_config if k != "hydra"])
                results[idx] = JobReturn(overrides=overrides, cfg=task_config, hydra_cfg=sweep_config,
                                         working_dir=str(run_dir), task_name=str(sweep_config.hydra.job.name),
                                         status=JobStatus.COMPLETED,
                                         _return_value=job_return_value(idx, overrides, run_dir, process.returncode))
        return [results[idx] for idx in sorted(results)]
