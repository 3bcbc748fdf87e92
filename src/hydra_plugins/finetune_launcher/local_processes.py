"""hydra/launcher=local_processes: every job of a sweep in its own Python process, `jobs` at a time, each given one
GPU of the node (CUDA_VISIBLE_DEVICES) when there are GPUs. finetune-compare's default launcher: a process per run
keeps each run's timings and peak memory its own; `jobs=<number of GPUs>` spreads a comparison over a node. For a
cluster, `hydra/launcher=slurm` (submitit) takes its place with no other change.

A job returns what its task function returned (the job writes it to job_return.json in its folder), so an Optuna
sweeper through this launcher reads each trial's metric. A job that fails returns None, as the in-process launcher's
jobs do (finetune.run.failures), and the others go on: its folder holds failure.json (written here for a job that died
without one), from which the sweep's summary lists it. launch() may be called from several threads at
once (the Optuna sweeper launches one trial per call from each of its n_jobs slots): GPUs are handed out across all
calls, one per running job.
"""

# no `from __future__ import annotations`: Hydra executes plugin modules outside sys.modules, where dataclasses
# cannot resolve string annotations
import logging
import os
import json
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from finetune.run.failures import FAILURE_FILE, JOB_RETURN_ENV

log = logging.getLogger(__name__)
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


@dataclass
class LocalProcessesConf:
    _target_: str = "hydra_plugins.finetune_launcher.local_processes.LocalProcessesLauncher"
    # the module each job runs as `python -m <module> <overrides>`
    module: str = "finetune.train"
    # jobs at once; above 1 without a GPU each, they share the CPU (each gets OMP_NUM_THREADS = cores / jobs unless
    # you set OMP_NUM_THREADS) and their timings are not comparable
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


def cpu_share(jobs: int) -> int:
    """The CPU threads each of `jobs` concurrent CPU jobs gets: the cores this process may use, shared out."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(jobs, 1))


class LocalProcessesLauncher(Launcher):
    def __init__(self, module: str = "finetune.train", jobs: int = 1, gpus: Optional[list] = None) -> None:
        super().__init__()
        self.module, self.jobs = module, max(int(jobs), 1)
        self.gpus = [str(gpu) for gpu in gpus] if gpus is not None else None
        self.config: Optional[DictConfig] = None
        self.hydra_context: Optional[HydraContext] = None
        # shared by concurrent launch() calls: HydraConfig is one global, and a GPU serves one job at a time
        self._lock = threading.Lock()
        self._gpus_in_use: set = set()

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context = config, hydra_context

    def _command(self, overrides: Sequence[str], run_dir: Path, idx: int) -> List[str]:
        from finetune.config import config_dir_flags

        # as typed: an override such as hydra.sweep.subdir=trial${hydra.job.num} must not be resolved here
        typed = OmegaConf.to_container(self.config.hydra.overrides.hydra, resolve=False)
        searchpath = [o for o in typed if o.startswith("hydra.searchpath")]
        # hydra.mode=RUN: a job's own overrides may select a config that sets MULTIRUN (hparams_search=...)
        return [sys.executable, "-m", self.module, *config_dir_flags(self.config.hydra), *overrides, *searchpath,
                f"hydra.run.dir={run_dir}", f"hydra.job.num={idx}", "hydra.mode=RUN"]

    def _claim_gpu(self, gpus: List[str]) -> Optional[str]:
        with self._lock:
            free = [gpu for gpu in gpus if gpu not in self._gpus_in_use]
            if free:
                self._gpus_in_use.add(free[0])
            return free[0] if free else None

    def _release_gpu(self, gpu: Optional[str]) -> None:
        with self._lock:
            self._gpus_in_use.discard(gpu)

    def _start(self, idx: int, overrides: Sequence[str], gpus: List[str]):
        """Start job `idx`, or return None when every GPU is taken (by this call or a concurrent one)."""
        gpu = self._claim_gpu(gpus) if gpus else None
        if gpus and gpu is None:
            return None
        with self._lock:
            sweep_config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            with open_dict(sweep_config):
                sweep_config.hydra.job.id = sweep_config.hydra.job.num = idx
            HydraConfig.instance().set_config(sweep_config)  # for ${hydra:...} in the sweep's subdir
            run_dir = Path(str(sweep_config.hydra.sweep.dir)) / str(sweep_config.hydra.sweep.subdir)
            with read_write(sweep_config.hydra), open_dict(sweep_config):  # set_config made it read-only
                sweep_config.hydra.runtime.output_dir = str(run_dir.resolve())
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / JOB_RETURN_FILE).unlink(missing_ok=True)
        env = dict(os.environ, **{JOB_RETURN_ENV: str((run_dir / JOB_RETURN_FILE).resolve())})
        if gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = gpu
        elif self.jobs > 1 and "OMP_NUM_THREADS" not in os.environ:
            # CPU jobs side by side: each its share of the cores. With torch's default (every core each), two
            # full fine-tuning jobs on 2 cores ran an epoch in 65 s against 22 s at one thread each (measured)
            env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(cpu_share(self.jobs))
        log.info("#%d%s: %s -> %s", idx, f" (GPU {gpu})" if gpu is not None else "",
                 " ".join(filter_overrides(overrides)), run_dir)
        process = subprocess.Popen(self._command(overrides, run_dir, idx), env=env)
        return idx, list(overrides), sweep_config, run_dir, process, gpu

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        assert self.config is not None and self.hydra_context is not None
        gpus = self.gpus if self.gpus is not None else visible_gpus()
        slots = max(min(self.jobs, len(gpus)) if gpus else self.jobs, 1)
        log.info("launching %d jobs, %d at a time%s", len(job_overrides), slots,
                 f", one GPU each of {', '.join(gpus)}" if gpus else "")
        pending = list(enumerate(job_overrides, start=initial_job_idx))
        running: Dict[int, tuple] = {}  # slot -> (idx, overrides, sweep config, run dir, process, gpu)
        results: Dict[int, JobReturn] = {}
        while pending or running:
            for slot in range(slots):
                if slot in running or not pending:
                    continue
                job = self._start(*pending[0], gpus)
                if job is None:  # every GPU is busy with jobs of other launch() calls
                    break
                pending.pop(0)
                running[slot] = job
            finished = [slot for slot, job in running.items() if job[4].poll() is not None]
            if not finished:
                time.sleep(0.2)
            for slot in finished:
                idx, overrides, sweep_config, run_dir, process, gpu = running.pop(slot)
                self._release_gpu(gpu)
                results[idx] = self._job_return(idx, overrides, sweep_config, run_dir, process.returncode)
        return [results[idx] for idx in sorted(results)]

    @staticmethod
    def _job_return(idx: int, overrides: List[str], sweep_config: DictConfig, run_dir: Path,
                    returncode: int) -> JobReturn:
        task_config = OmegaConf.masked_copy(sweep_config, [k for k in sweep_config if k != "hydra"])
        return JobReturn(overrides=overrides, cfg=task_config, hydra_cfg=sweep_config, working_dir=str(run_dir),
                         task_name=str(sweep_config.hydra.job.name), status=JobStatus.COMPLETED,
                         _return_value=job_return_value(idx, overrides, run_dir, returncode))
