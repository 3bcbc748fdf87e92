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


def run_main(module: str, *overrides: str, cwd: Path) -> subprocess.CompletedProcess:
    """An entry point's main() in this process, with the command line in sys.argv: the code path of run_cli without
    a new interpreter's ten seconds of imports, for tests of what a mistake prints and the exit code it gives."""
    import contextlib
    import importlib
    import io
    import logging

    from hydra.core.global_hydra import GlobalHydra

    main = importlib.import_module(module).main
    stdout, stderr = io.StringIO(), io.StringIO()
    saved = sys.argv, os.getcwd(), logging.root.handlers[:], logging.root.level
    sys.argv = [f"{module.replace('.', '/')}.py", *overrides]
    os.chdir(cwd)
    GlobalHydra.instance().clear()
    code = 0
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            main()
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else int(exit_.code is not None)
    finally:  # Hydra configured logging for the job: give pytest its handlers back
        sys.argv, cwd_before, logging.root.handlers[:], level = saved
        logging.root.setLevel(level)
        os.chdir(cwd_before)
        GlobalHydra.instance().clear()
    return subprocess.CompletedProcess(sys.argv, code, stdout.getvalue(), stderr.getvalue())


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
    assert set(metrics) >= {"strategy", "backbone", "data", "best_val_acc", "test_acc", "fit_seconds",
                            "train_samples_per_second", "peak_memory_mb", "trainable_params", "total_params",
                            "epochs"}
    assert metrics["strategy"] == strategy
    audit = json.loads((run_dir / "param_audit.json").read_text())
    assert audit["violations"] == [] and audit["parameters"] and audit["buffers"]
    assert (run_dir / ".hydra" / "config.yaml").exists()


def test_unknown_strategy_lists_the_choices(tmp_path):
    result = run_main("finetune.train", "strategy=frozen", cwd=tmp_path)
    assert result.returncode != 0
    for choice in ("cached", "freeze", "full", "no_grad"):
        assert choice in result.stderr


def test_config_mistake_is_one_line_naming_field_and_choices(tmp_path):
    result = run_main("finetune.train", *TINY, "strategy=freeze", "strategy.modules=[nope]",
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
