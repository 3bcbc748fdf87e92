"""Resume exactly: a run killed with SIGKILL mid-epoch and resumed ends with the weights of an uninterrupted run."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import TINY
from tests.test_cli import run_cli

# 64 fake images in batches of 16: 4 steps an epoch; a checkpoint every 2 steps; 3 epochs in all.
RUN = [*TINY, "trainer.max_epochs=3", "trainer.deterministic=true", "callbacks.last_checkpoint.every_n_train_steps=2"]


def final_weights(run_dir):
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]


CASES = {"full": ["strategy=full"], "cached": ["strategy=cached"],
         # a partial freeze: the frozen stem and its BN modes must come back with the resumed run
         "partial_freeze": ["strategy=freeze", "strategy.modules=[conv_stem,bn1,blocks.0]"]}


@pytest.mark.parametrize("case", list(CASES))
def test_killed_mid_epoch_and_resumed_matches_an_uninterrupted_run(tmp_path, case):
    overrides = CASES[case]
    cache = f"paths.cache_dir={tmp_path / 'cache'}"
    straight = run_cli("finetune.train", *RUN, *overrides, cache, f"hydra.run.dir={tmp_path / 'straight'}",
                       cwd=tmp_path)
    assert straight.returncode == 0, straight.stderr[-2000:]

    killed_dir = tmp_path / "killed"
    killed = run_cli("finetune.train", *RUN, *overrides, cache, f"hydra.run.dir={killed_dir}",
                     "+callbacks.kill._target_=tests.faults.KillAtStep", "+callbacks.kill.step=7", cwd=tmp_path)
    assert killed.returncode == -9, "the run must die by SIGKILL"
    checkpoint = torch.load(killed_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == 6 and checkpoint["epoch"] == 1, "the last checkpoint is mid-epoch 2"

    resumed = run_cli("finetune.train", *RUN, *overrides, cache, f"hydra.run.dir={killed_dir}",
                      f"ckpt_path={killed_dir / 'checkpoints' / 'last.ckpt'}", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    expected, actual = final_weights(tmp_path / "straight"), final_weights(killed_dir)
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.equal(expected[name], actual[name]), f"{name} differs after resume"
    audit = json.loads((killed_dir / "param_audit.json").read_text())
    assert audit["violations"] == [], "the resumed run keeps the strategy's frozen set and BN modes"


def test_resuming_with_another_strategy_is_refused_clearly(tmp_path):
    first = run_cli("finetune.train", *TINY, "strategy=freeze", "trainer.max_epochs=1", f"hydra.run.dir={tmp_path / 'a'}",
                    cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    second = run_cli("finetune.train", *TINY, "strategy=full", f"ckpt_path={tmp_path / 'a' / 'checkpoints' / 'last.ckpt'}",
                     f"hydra.run.dir={tmp_path / 'b'}", cwd=tmp_path)
    assert second.returncode == 2
    assert "error: checkpoint was trained with strategy=freeze, this run uses strategy=full" in second.stderr


@pytest.mark.parametrize("change,named", [
    (["strategy.modules=[conv_stem,bn1]"], "strategy.modules=[conv_stem,bn1] (checkpoint: null)"),
    (["optimizer.lr=0.001"], "optimizer.lr=0.001 (checkpoint: 0.01)"),
    (["head=mlp"], "head._target_=finetune.heads.MLPHead (checkpoint: finetune.heads.LinearHead)"),
    (["trainer.max_epochs=5"], "trainer.max_epochs=5 (checkpoint: 2)"),
])
def test_resuming_with_a_changed_config_names_what_differs_and_how_to_restore_it(tiny, change, named):
    from finetune.errors import ConfigError
    from finetune.train import build

    _, trained = build(tiny("strategy=freeze"))
    checkpoint = {"finetune": {"strategy": "freeze", "config": trained.run_config}}
    _, resuming = build(tiny("strategy=freeze", *change))
    with pytest.raises(ConfigError, match=r"cannot resume: .*") as raised:
        resuming.on_load_checkpoint(checkpoint)
    message = str(raised.value)
    assert named in message and "\n" not in message
    restore = message.split("resume with the checkpoint's values (")[1].split(")")[0]
    assert all("=" in pair for pair in restore.split()), "ready to paste as overrides"


def test_resuming_with_only_paths_loggers_or_workers_changed_is_allowed(tiny, tmp_path):
    from finetune.train import build

    _, trained = build(tiny("strategy=freeze"))
    _, resuming = build(tiny("strategy=freeze", "logger=tensorboard", "trainer.log_every_n_steps=1",
                             "backbone.checkpoint_path=null", f"paths.log_dir={tmp_path / 'elsewhere'}"))
    resuming.on_load_checkpoint({"finetune": {"strategy": "freeze", "config": trained.run_config}})
