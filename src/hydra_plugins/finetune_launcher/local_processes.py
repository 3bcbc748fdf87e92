"""hydra/launcher=local_processes: every job of a sweep in its own Python process, `jobs` at a time, each given one
GPU of the node (CUDA_VISIBLE_DEVICES) when there are GPUs. finetune-compare's default launcher: a process per run
keeps each run's timings and peak memory its own; `jobs=<number of GPUs>` spreads a comparison over a node. For a
cluster, `hydra/launcher=slurm` (submitit) takes its place with no other change.

A job that fails (non-zero exit) is reported as failed and the others go on; its folder holds failure.json or its
train.log.
"""

# no `from __future__ import annotations`: Hydra executes plugin modules outside sys.modules, where dataclasses
# cannot resolve string annotations
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


class LocalProcessesLauncher(Launcher):
    def __init__(self, module: str = "finetune.train", jobs: int = 1, gpus: Optional[list] = None) -> None:
        super().__init__()
        self.module, self.jobs = module, max(int(jobs), 1)
        self.gpus = [str(gpu) for gpu in gpus] if gpus is not None else None
        self.config: Optional[DictConfig] = None
        self.hydra_context: Optional[HydraContext] = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context = config, hydra_context

    def _command(self, overrides: Sequence[str], run_dir: Path) -> List[str]:
        searchpath = [o for o in self.config.hydra.overrides.hydra if o.startswith("hydra.searchpath")]
        return [sys.executable, "-m", self.module, *overrides, *searchpath, f"hydra.run.dir={run_dir}"]

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
                env = dict(os.environ)
                if gpus:
                    env["CUDA_VISIBLE_DEVICES"] = gpus[slot % len(gpus)]
                log.info("#%d%s: %s -> %s", idx, f" (GPU {env['CUDA_VISIBLE_DEVICES']})" if gpus else "",
                         " ".join(filter_overrides(overrides)), run_dir)
                process = subprocess.Popen(self._command(overrides, run_dir), env=env)
                running[slot] = (idx, list(overrides), sweep_config, run_dir, process)
            finished = [slot for slot, job in running.items() if job[4].poll() is not None]
            if not finished:
                time.sleep(0.2)
            for slot in finished:
                idx, overrides, sweep_config, run_dir, process = running.pop(slot)
                status = JobStatus.COMPLETED if process.returncode == 0 else JobStatus.FAILED
                if status is JobStatus.FAILED:
                    log.error("#%d failed (exit %d): see %s", idx, process.returncode, run_dir)
                task_config = OmegaConf.masked_copy(sweep_config, [k for k in sweep_config if k != "hydra"])
                results[idx] = JobReturn(overrides=overrides, cfg=task_config, hydra_cfg=sweep_config,
                                         working_dir=str(run_dir), task_name=str(sweep_config.hydra.job.name),
                                         status=status,
                                         _return_value=process.returncode if status is JobStatus.COMPLETED else
                                         RuntimeError(f"job {idx} exited with {process.returncode}"))
        return [results[idx] for idx in sorted(results)]
