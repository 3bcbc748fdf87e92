"""What a run must share with the checkpoint it resumes: the config keys its saved state depends on (parameter
groups, schedule length, data order) and the number of processes (devices x nodes: the steps per epoch, hence the
phase starts and the data each rank saw). Anything else (paths, loggers, callbacks, workers, where pretrained weights
came from) may change between a run and its resumption."""

from __future__ import annotations

from typing import Any

from finetune.errors import ConfigError
from finetune.run.names import under_any

RESUME_MUST_MATCH = ("strategy", "backbone", "head", "optimizer", "scheduler", "data", "seed", "trainer.max_epochs",
                     "trainer.max_steps", "trainer.accumulate_grad_batches", "trainer.limit_train_batches")
RESUME_MAY_DIFFER = ("backbone.pretrained", "backbone.checkpoint_path", "data.num_workers", "data.eval_batch_size",
                     "data.verify_images", "data.root", "data.store_dir", "strategy.cache_dir", "strategy.extract_batch_size",
                     "strategy.device_max_bytes", "strategy.shard_rows")


def override_value(value: Any) -> str:
    """A value as a Hydra command-line override writes it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(override_value(v) for v in value) + "]"
    return str(value)


def flatten(config: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def resume_differences(saved: dict, current: dict) -> list[tuple[str, Any, Any]]:
    """(key, checkpoint's value, this run's value) for every resume-relevant key that differs."""
    saved, current = flatten(saved), flatten(current)
    keys = sorted(k for k in saved.keys() | current.keys()
                  if under_any(k, RESUME_MUST_MATCH) and not under_any(k, RESUME_MAY_DIFFER))
    return [(k, saved.get(k), current.get(k)) for k in keys if saved.get(k) != current.get(k)]


def processes(trainer) -> dict[str, int]:
    """The run's processes as the checkpoint records them."""
    return {"devices": int(trainer.num_devices), "num_nodes": int(trainer.num_nodes)}


def check_resume(saved: dict, run_config: dict | None, trainer=None) -> None:
    """One line, naming the overrides to use, when this run cannot continue the checkpoint's state exactly (the
    processes are checked when a trainer is resuming)."""
    saved_config = saved.get("config")
    differences = resume_differences(saved_config, run_config) if saved_config and run_config else []
    if differences:
        listed = ", ".join(f"{key}={override_value(ours)} (checkpoint: {override_value(theirs)})"
                           for key, theirs, ours in differences)
        restore = " ".join(f"{key}={override_value(theirs)}" for key, theirs, _ in differences)
        raise ConfigError(f"cannot resume: this run differs from the checkpoint in what its saved state depends on "
                          f"(parameter groups, schedule length, data order): {listed}; resume with the "
                          f"checkpoint's values ({restore}), or start a new run instead of resuming")
    if trainer is None:
        return
    then, now = saved.get("processes"), processes(trainer)
    if then and then["devices"] * then["num_nodes"] != now["devices"] * now["num_nodes"]:
        raise ConfigError(f"cannot resume: the checkpoint was written by {then['devices'] * then['num_nodes']} "
                          f"process(es) ({then['devices']} device(s) x {then['num_nodes']} node(s)), this run has "
                          f"{now['devices'] * now['num_nodes']}: the steps per epoch, the phase starts and each rank's "
                          f"data depend on it; resume with trainer.devices={then['devices']} "
                          f"trainer.num_nodes={then['num_nodes']}, or start a new run from its weights")
