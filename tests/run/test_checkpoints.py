"""last.ckpt is always the latest state, whatever the monitored metric does; the best checkpoint is kept beside it."""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from hydra.utils import instantiate

from finetune.build import build, instantiate_all
from finetune.train import train
from tests.conftest import fit

# 64 fake images in batches of 16: 4 optimizer steps an epoch. A learning rate this small leaves val/acc where it was
# after the first epoch, so no later epoch improves on it.
FLAT = ["strategy=freeze", "optimizer.lr=1e-12", "trainer.max_epochs=3"]


def load(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def test_last_checkpoint_is_the_final_state_when_val_stops_improving(tiny, tmp_path):
    cfg = tiny(*FLAT)
    L.seed_everything(cfg.seed)
    metrics = train(cfg)
    last = load(tmp_path / "checkpoints" / "last.ckpt")
    assert last["global_step"] == 3 * 4, "last.ckpt holds every step taken"
    assert last["epoch"] == 2
    best = load(metrics["best_checkpoint"])
    assert best["global_step"] == 4, "val/acc never improved after epoch 0: the best checkpoint is epoch 0's"


def test_last_checkpoint_every_n_steps_follows_the_steps(tiny, tmp_path):
    steps_seen = []

    class ReadLast(L.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            path = tmp_path / "checkpoints" / "last.ckpt"
            if path.exists():
                steps_seen.append(load(path)["global_step"])

    cfg = tiny(*FLAT, "callbacks.last_checkpoint.every_n_train_steps=3")
    L.seed_everything(cfg.seed)
    datamodule, module = build(cfg)
    trainer = instantiate(cfg.trainer, callbacks=[*instantiate_all(cfg.callbacks), ReadLast()],
                          logger=instantiate_all(cfg.logger))
    trainer.fit(module, datamodule=datamodule)
    # Lightning runs checkpoint callbacks last: at each step ReadLast sees what earlier steps wrote
    assert {3, 6, 9} <= set(steps_seen), steps_seen
    assert load(tmp_path / "checkpoints" / "last.ckpt")["global_step"] == 12


def test_lightning_alone_leaves_a_stale_last_checkpoint(tiny, tmp_path):
    """Why LastCheckpoint exists: the installed Lightning's ModelCheckpoint(save_last=True) with a monitor writes
    last.ckpt only with a top-k checkpoint. If this starts failing, Lightning changed and LastCheckpoint may go."""
    cfg = tiny(*FLAT, "~callbacks.last_checkpoint", "callbacks.model_checkpoint.save_last=true")
    fit(cfg)
    assert load(tmp_path / "checkpoints" / "last.ckpt")["global_step"] == 4, "Lightning's last.ckpt stopped at epoch 0"
    assert ModelCheckpoint.CHECKPOINT_NAME_LAST == "last"
