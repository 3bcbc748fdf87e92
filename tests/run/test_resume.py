"""Resuming refuses what would not resume exactly: another strategy, or a config its saved state depends on."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import TINY, compose_config, fit
from tests.test_cli import run_main

# Killed with SIGKILL mid-epoch and resumed, bitwise against an uninterrupted run: tests/strategies/test_staged.py, whose lp_ft run
# is killed mid-probe (cached features), at the phase boundary and mid-finetune (the whole backbone training, every
# BatchNorm kept in eval mode, which the resumed run's audit checks).


def test_resuming_with_another_strategy_is_refused_clearly(tmp_path):
    fit(compose_config(tmp_path / "a", [*TINY, "strategy=freeze", "trainer.max_epochs=1"]))
    second = run_main("finetune.train", *TINY, "strategy=full", f"ckpt_path={tmp_path / 'a' / 'checkpoints' / 'last.ckpt'}",
                     f"hydra.run.dir={tmp_path / 'b'}", cwd=tmp_path)
    assert second.returncode == 2
    assert "error: checkpoint was trained with strategy=freeze, this run uses strategy=full" in second.stderr


@pytest.mark.parametrize("change,named", [
    (["strategy.modules=[conv_stem,bn1]"], "strategy.modules=[conv_stem,bn1] (checkpoint: null)"),
    (["optimizer.lr=0.001"], "optimizer.lr=0.001 (checkpoint: 0.01)"),
    (["head=mlp"], "head._target_=finetune.heads.MLPHead (checkpoint: finetune.heads.LinearHead)"),
    (["trainer.max_epochs=5"], "trainer.max_epochs=5 (checkpoint: 2)"),
    (["+trainer.limit_train_batches=2"], "trainer.limit_train_batches=2 (checkpoint: null)"),
])
def test_resuming_with_a_changed_config_names_what_differs_and_how_to_restore_it(tiny, change, named):
    from finetune.errors import ConfigError
    from finetune.build import build

    _, trained = build(tiny("strategy=freeze"))
    checkpoint = {"finetune": {"strategy": "freeze", "config": trained.run_config}}
    _, resuming = build(tiny("strategy=freeze", *change))
    with pytest.raises(ConfigError, match=r"cannot resume: .*") as raised:
        resuming.on_load_checkpoint(checkpoint)
    message = str(raised.value)
    assert named in message and "\n" not in message
    restore = message.split("resume with the checkpoint's values (")[1].split(")")[0]
    assert all("=" in pair for pair in restore.split()), "ready to paste as overrides"


def test_resuming_on_another_number_of_processes_is_refused_with_the_overrides_to_use(tmp_path):
    """The steps per epoch, and with them the phase starts and each rank's data, depend on devices x nodes: a
    checkpoint of a 2-process run resumed by one process is refused, naming trainer.devices=2."""
    fit(compose_config(tmp_path / "a", [*TINY, "strategy=freeze", "trainer.max_epochs=1"]))
    checkpoint = torch.load(tmp_path / "a" / "checkpoints" / "last.ckpt", weights_only=False)
    assert checkpoint["finetune"]["processes"] == {"devices": 1, "num_nodes": 1}
    checkpoint["finetune"]["processes"] = {"devices": 2, "num_nodes": 1}  # as a trainer=ddp_cpu run writes it
    torch.save(checkpoint, tmp_path / "two.ckpt")
    resumed = run_main("finetune.train", *TINY, "strategy=freeze", "trainer.max_epochs=1",
                       f"ckpt_path={tmp_path / 'two.ckpt'}", f"hydra.run.dir={tmp_path / 'b'}", cwd=tmp_path)
    assert resumed.returncode == 2 and len(resumed.stderr.strip().splitlines()) == 1, resumed.stderr[-2000:]
    assert "written by 2 process(es) (2 device(s) x 1 node(s)), this run has 1" in resumed.stderr
    assert "resume with trainer.devices=2 trainer.num_nodes=1" in resumed.stderr


def test_resuming_with_only_paths_loggers_or_workers_changed_is_allowed(tiny, tmp_path):
    from finetune.build import build

    _, trained = build(tiny("strategy=freeze"))
    _, resuming = build(tiny("strategy=freeze", "logger=tensorboard", "trainer.log_every_n_steps=1",
                             "backbone.checkpoint_path=null", f"paths.log_dir={tmp_path / 'elsewhere'}"))
    resuming.on_load_checkpoint({"finetune": {"strategy": "freeze", "config": trained.run_config}})


def test_a_run_resumed_mid_epoch_draws_the_same_dropout_masks(tmp_path):
    """An MLP head with dropout 0.5: resumed from the step-6 checkpoint (mid-epoch 2), the weights at the end are
    bitwise those of the run that never stopped, because the checkpoint carries the random streams."""
    from finetune.train import train

    run = [*TINY, "strategy=freeze", "head=mlp", "head.dropout=0.5", "trainer.deterministic=true",
           "callbacks.last_checkpoint.every_n_train_steps=2"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    middle = tmp_path / "step6.ckpt"
    train(compose_config(straight, [*run, "+callbacks.copy._target_=tests.run.faults.CopyCheckpointAtStep",
                                    "+callbacks.copy.step=6", f"+callbacks.copy.source={straight}/checkpoints/last.ckpt",
                                    f"+callbacks.copy.copy_to={middle}"]))
    assert torch.load(middle, weights_only=False)["global_step"] == 6
    train(compose_config(resumed, [*run, f"ckpt_path={middle}"]))
    expected, actual = (torch.load(folder / "checkpoints" / "last.ckpt", weights_only=True)
                        for folder in (straight, resumed))  # weights_only: what Lightning's resume loads with
    assert expected["global_step"] == actual["global_step"] == 8
    for name, tensor in expected["state_dict"].items():
        assert torch.equal(tensor, actual["state_dict"][name]), f"{name} differs after resume"
