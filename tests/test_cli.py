"""The top-level configs compose; each strategy runs end to end through the real command line (every group option
trains a step in tests/test_configs.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from finetune.config import CONFIG_DIR
from tests.conftest import TINY, compose_config

@pytest.mark.parametrize("name", ["train", "eval"])
def test_top_level_configs_compose(tmp_path, name):
    cfg = compose_config(tmp_path, ["ckpt_path=x.ckpt"] if name == "eval" else [], config_name=name)
    OmegaConf.to_container(cfg, resolve=True)


def cli_env() -> dict[str, str]:
    # the repository root on the path, so configs can select `_target_: tests....` helpers
    root = str(Path(__file__).resolve().parents[1])
    return {**os.environ, "PYTHONWARNINGS": "ignore",
            "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}


def run_cli(module: str, *overrides: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *overrides], cwd=cwd, capture_output=True, text=True,
                          env=cli_env(), timeout=300)


def start_cli(module: str, *overrides: str, cwd: Path, log: Path) -> subprocess.Popen:
    """The CLI in the background, its output into `log`, for tests that run several at once."""
    with open(log, "w") as output:
        return subprocess.Popen([sys.executable, "-m", module, *overrides], cwd=cwd, stdout=output,
                                stderr=subprocess.STDOUT, env=cli_env())


@pytest.mark.parametrize("strategy", ["cached"])  # every strategy trains in-process in test_configs.py
def test_fast_dev_run_from_the_command_line(tmp_path, strategy):
    run_dir = tmp_path / "run"
    result = run_cli("finetune.train", f"strategy={strategy}", "debug=fdr", *TINY, f"hydra.run.dir={run_dir}",
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "test accuracy" in result.stdout and f"run directory: {run_dir}" in result.stdout
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert set(metrics) >= {"strategy", "backbone", "data", "val_acc", "test_acc", "fit_seconds",
                            "train_samples_per_second", "peak_memory_mb", "trainable_params", "total_params",
                            "epochs"}
    assert metrics["strategy"] == strategy
    audit = json.loads((run_dir / "param_audit.json").read_text())
    assert audit["violations"] == [] and audit["parameters"] and audit["buffers"]
    assert (run_dir / ".hydra" / "config.yaml").exists()


def test_unknown_strategy_lists_the_choices(tmp_path):
    result = run_cli("finetune.train", "strategy=frozen", cwd=tmp_path)
    assert result.returncode != 0
    for choice in ("cached", "freeze", "full", "no_grad"):
        assert choice in result.stderr


def test_config_mistake_is_one_line_naming_field_and_choices(tmp_path):
    result = run_cli("finetune.train", *TINY, "strategy=freeze", "strategy.modules=[nope]",
                     f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode == 2
    assert "error: strategy.modules entry 'nope' names no submodule" in result.stderr
    assert "Traceback" not in result.stderr


def test_multinode_slurm_experiment_composes_with_the_submitit_launcher(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=["experiment=slurm_multinode", f"paths.output_dir={tmp_path}"],
                      return_hydra_config=True)
    assert "submitit" in cfg.hydra.launcher._target_.lower()
    assert cfg.hydra.launcher.nodes == cfg.trainer.num_nodes == 2
    assert cfg.hydra.launcher.tasks_per_node == cfg.trainer.devices == 4
    assert cfg.trainer.strategy == "ddp" and cfg.trainer.accelerator == "gpu"
