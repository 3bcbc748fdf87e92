"""The error policy of every entry point: a ConfigError becomes one line on stderr and exit code 2, every failure is
written into the job's folder (failure.json), and in a sweep a failed job returns instead of ending the sweep."""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
import traceback
from pathlib import Path

from finetune.errors import ConfigError, user_error

log = logging.getLogger("finetune")

FAILURE_FILE = "failure.json"
# set by hydra/launcher=local_processes: where a job in its own process leaves its return value for the sweeper


def one_line(err: ConfigError) -> str:
    """The message, also when a DataLoader worker re-raised it inside a traceback ('pkg.Class: message')."""
    line = str(err).strip().splitlines()[-1]
    prefix = f"{type(err).__module__}.{type(err).__name__}: "
    return line[len(prefix):] if line.startswith(prefix) else line


def job_output_dir() -> Path | None:
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir) if HydraConfig.initialized() else None


def in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def record_failure(err: BaseException, message: str) -> None:
    """Write why the job failed into its own folder (rank 0 only), for the sweep summary and finetune-compare."""
    from hydra.core.hydra_config import HydraConfig
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    output_dir = job_output_dir()
    if output_dir is None or rank_zero_only.rank != 0:
        return
    hydra_cfg = HydraConfig.get()
    record = {"error": message, "type": type(err).__name__, "job": hydra_cfg.job.get("num"),
              "strategy": hydra_cfg.runtime.choices.get("strategy"),
              "overrides": list(hydra_cfg.overrides.task), "traceback": traceback.format_exc()}
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / FAILURE_FILE).write_text(json.dumps(record, indent=1))
    except OSError as write_error:
        log.warning("could not write %s (%s)", output_dir / FAILURE_FILE, write_error)


def report_user_errors(task):
    """Run an entry point's task. A ConfigError raised anywhere becomes one line on stderr and exit code 2; any
    failure is written to the job's failure.json. In a multirun the failed job returns None instead, so the sweep goes
    on (an Optuna sweeper records the trial as failed) and SweepSummary reports every failed job at the end."""

    @functools.wraps(task)
    def wrapper(*args, **kwargs):
        output_dir = job_output_dir()
        if output_dir is not None:
            (output_dir / FAILURE_FILE).unlink(missing_ok=True)  # a rerun into the same folder starts clean
        try:
            value = task(*args, **kwargs)
            write_job_return(value)
            return value
        except Exception as err:
            cause = user_error(err)
            message = one_line(cause) if cause is not None else f"{type(err).__name__}: {first_line(err)}"
            record_failure(err, message)
            if in_multirun():
                log.error("job failed: %s", message, exc_info=cause is None)
                return None
            if cause is None:
                raise
            log.error(message)
            print(f"error: {message}", file=sys.stderr)
            sys.exit(2)

    return wrapper


# Set by hydra/launcher=local_processes for each job it starts: the file the job writes its return value to, as
# JSON, which the launcher hands to the sweeper (an Optuna study reads the trial's value from it)
JOB_RETURN_ENV = "FINETUNE_JOB_RETURN_FILE"


def write_job_return(value) -> None:
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    path = os.environ.get(JOB_RETURN_ENV)
    if path and rank_zero_only.rank == 0:
        Path(path).write_text(json.dumps({"return_value": value}))


def first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else ""
