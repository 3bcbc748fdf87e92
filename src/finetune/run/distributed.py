"""Lightning DDP inside a Hydra multirun (each job's ranks run that job, in that job's folder), and one drawn seed
for ranks that something else started (torchrun, SLURM)."""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import open_dict, read_write

# What Lightning's DDP launcher sets in the launching process; a LOCAL_RANK left behind would make the next job
# believe something else already started its ranks, and wait for them forever.
DDP_LAUNCH_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")


# Command-line flags that choose configs (kept for the ranks) and the sweep's own hydra settings (dropped: a rank
# runs one job, in the job's folder).
CONFIG_FLAGS = ("-cd", "--config-dir", "-cn", "--config-name", "-cp", "--config-path")
SWEEP_ONLY = ("hydra.mode", "hydra.sweep.", "hydra.sweeper", "hydra/sweeper", "hydra.launcher", "hydra/launcher",
              "hydra.run.dir", "hydra.job.name", "hydra.output_subdir")


def job_command_line(argv: list[str], hydra_overrides: list[str], task_overrides: list[str]) -> list[str]:
    """The arguments that run this one job: the config flags of the sweep's command line (-cd, -cn, -cp), its hydra
    overrides but the sweep's own (hydra.searchpath stays), and the job's task overrides."""
    flags, i = [], 0
    while i < len(argv):
        name = argv[i].split("=", 1)[0]
        if name in CONFIG_FLAGS:
            takes_value = "=" not in argv[i] and i + 1 < len(argv)
            flags += argv[i:i + 1 + takes_value]
            i += 1 + takes_value
            continue
        i += 1
    kept = [o for o in hydra_overrides if not o.lstrip("+~").startswith(SWEEP_ONLY)]
    return [*flags, *kept, *task_overrides]


@contextmanager
def ddp_ranks_join_this_job(trainer):
    """Lightning starts DDP ranks by re-running sys.argv with `hydra.run.dir` set to Hydra's *run* dir. In a
    multirun that command is the whole sweep and that dir is not the job's, so every rank would start its own sweep
    in a new folder (lightning-hydra-template's duplicate run directories). Within this block the ranks get the
    job's own overrides and folder; afterwards the process group and the launcher's environment are undone so the
    sweep's next job launches its own."""
    in_multirun = HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    if trainer.world_size == 1 or not in_multirun:
        yield
        return
    hydra_cfg = HydraConfig.get()
    with read_write(hydra_cfg), open_dict(hydra_cfg):
        hydra_cfg.run.dir = hydra_cfg.runtime.output_dir
    argv, sys.argv = sys.argv, [sys.argv[0], *job_command_line(sys.argv[1:], list(hydra_cfg.overrides.hydra),
                                                                list(hydra_cfg.overrides.task))]
    saved_env = {name: os.environ.get(name) for name in DDP_LAUNCH_ENV}
    try:
        yield
    finally:
        sys.argv = argv
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def seed_of_rank_zero(trainer, seed: int) -> int:
    """The seed every rank uses when each drew its own (seed=null): rank 0's, broadcast. Ranks that torchrun or SLURM
    started share no environment with rank 0, so the process group starts here, before the data and the model are
    built; Lightning's fit finds it started (`_init_dist_connection` exits early). Ranks that Lightning started
    inherit rank 0's draw and never come here."""
    strategy = trainer.strategy
    environment = getattr(strategy, "cluster_environment", None)
    if trainer.world_size == 1 or environment is None or not environment.creates_processes_externally:
        return seed
    strategy.setup_environment()
    return int(strategy.broadcast(seed, src=0))
