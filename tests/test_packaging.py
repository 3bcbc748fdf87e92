"""A wheel, installed outside the checkout, runs the main job from an empty folder with its packaged configs."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_a_built_wheel_runs_the_main_job_from_an_empty_folder(tmp_path):
    source = tmp_path / "source"  # build from a copy, so the checkout gets no build/ folder
    shutil.copytree(ROOT / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    isolation = [] if importlib.util.find_spec("setuptools") is None else ["--no-build-isolation"]
    pip = [sys.executable, "-m", "pip", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", *isolation, "-w", str(tmp_path / "dist"), str(source)], check=True)
    wheel = next((tmp_path / "dist").glob("finetune-*.whl"))
    site = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True)

    empty = tmp_path / "empty"
    user_configs = empty / "my_configs" / "experiment"  # a user's own config beside the packaged ones
    user_configs.mkdir(parents=True)
    (user_configs / "short.yaml").write_text("# @package _global_\ntrainer:\n  max_epochs: 2\n")
    env = {**os.environ, "PYTHONPATH": str(site), "PYTHONWARNINGS": "ignore"}
    where = subprocess.run([sys.executable, "-c", "import finetune; print(finetune.__file__)"], cwd=empty, env=env,
                           capture_output=True, text=True, check=True).stdout
    assert where.startswith(str(site)), f"the installed wheel, not the checkout: {where}"
    result = subprocess.run([str(site / "bin" / "finetune-train"), "-cd", "my_configs", "experiment=short",
                             "trainer.enable_progress_bar=false", "~callbacks.progress_bar"], cwd=empty, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "test accuracy" in result.stdout
    run_dir = Path(result.stdout.split("run directory: ")[1].strip())
    assert (empty / run_dir / "metrics.json").exists() and (empty / run_dir / "checkpoints" / "last.ckpt").exists()
    assert "max_epochs: 2" in (empty / run_dir / ".hydra" / "config.yaml").read_text()
    # the wheel carries finetune-compare's Hydra launcher plugin (hydra_plugins/finetune_launcher): it composes
    launcher = subprocess.run([str(site / "bin" / "finetune-compare"), "--cfg", "hydra", "--package", "hydra.launcher"],
                              cwd=empty, env=env, capture_output=True, text=True, timeout=120)
    assert "LocalProcessesLauncher" in launcher.stdout, launcher.stderr[-2000:]


def test_no_internal_issue_numbers_in_the_docs_code_or_tests():
    """A reader has no access to this project's tracker: an issue or review number says nothing to them; the text
    says what the figure or the fault was instead."""
    import re

    reference = re.compile(r"\b(issue|review|ticket|PR)\s?#\d+", re.IGNORECASE)
    files = [ROOT / "README.md", *(p for folder in ("src", "tests", "scripts", "docs") for p in (ROOT / folder).rglob("*")
                                   if p.is_file() and p.suffix in (".py", ".md", ".yaml", ".sh", ".txt", ".toml")
                                   and "egg-info" not in str(p))]
    found = [f"{path.relative_to(ROOT)}:{n}: {line.strip()}" for path in files
             for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if reference.search(line)]
    assert len(files) > 50 and found == [], "\n".join(found)
