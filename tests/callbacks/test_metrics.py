"""What the loggers receive: sample-weighted epoch losses, each step's own loss, and the resolved run config."""

from __future__ import annotations

import csv

import lightning as L
import pytest
import torch
import torch.nn.functional as F
import yaml
from hydra.utils import instantiate

from finetune.build import build, instantiate_all
from tests.conftest import fit


def test_val_loss_is_the_mean_over_samples_not_over_batches(tiny):
    # 16 val images in batches of 6, 6 and 4: a mean of batch means would weigh the last 4 images as 6
    trainer, module, datamodule = fit(tiny("strategy=freeze", "data.eval_batch_size=6", "trainer.max_epochs=1"))
    images, labels = datamodule.splits["val"]
    module.eval()
    with torch.no_grad():
        expected = F.cross_entropy(module(datamodule.preprocess(images)), labels)
    torch.testing.assert_close(trainer.callback_metrics["val/loss"], expected, rtol=1e-5, atol=1e-6)


def test_the_step_loss_written_at_a_step_is_that_steps_loss(tiny, tmp_path):
    losses = {}

    class RecordLoss(L.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            losses[trainer.global_step] = float(outputs["loss"])

    cfg = tiny("strategy=freeze", "trainer.log_every_n_steps=2")
    L.seed_everything(cfg.seed)
    datamodule, module = build(cfg)
    trainer = instantiate(cfg.trainer, callbacks=[*instantiate_all(cfg.callbacks), RecordLoss()],
                          logger=instantiate_all(cfg.logger))
    trainer.fit(module, datamodule=datamodule)
    with open(tmp_path / "csv" / "metrics.csv") as handle:
        written = [(int(r["step"]), float(r["train/loss_step"])) for r in csv.DictReader(handle)
                   if r.get("train/loss_step")]
    assert [step for step, _ in written] == [1, 3, 5, 7], "every log_every_n_steps=2 steps (0-based), none missed"
    for step, value in written:  # the logger's step s is the (s+1)-th optimizer step
        assert value == pytest.approx(losses[step + 1], abs=1e-6), f"step {step} holds another step's loss"


def test_the_resolved_config_reaches_csv_and_tensorboard(tiny, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    fit(tiny("strategy=freeze", "optimizer.lr=0.005", "logger=many_loggers", "trainer.max_epochs=1"))
    hparams = yaml.safe_load((tmp_path / "csv" / "hparams.yaml").read_text())
    assert hparams["strategy"]["_target_"] == "finetune.strategies.FreezeBackbone"
    assert hparams["optimizer"]["lr"] == 0.005 and hparams["backbone"]["name"] == "test_efficientnet"

    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    logged = {}
    for content in events.PluginTagToContent("hparams").values():
        data = plugin_data_pb2.HParamsPluginData.FromString(content)
        logged.update({k: v for k, v in data.session_start_info.hparams.items()})
    assert logged["optimizer/lr"].number_value == 0.005
    assert logged["strategy/_target_"].string_value == "finetune.strategies.FreezeBackbone"
    assert logged["backbone/name"].string_value == "test_efficientnet"


def test_metrics_json_names_what_it_stores_whatever_the_checkpoint_monitors(tmp_path):
    """callbacks.model_checkpoint.monitor=val/loss: best_val_acc is still the best logged val/acc (it held the
    monitored loss before, and optimized_metric=val/acc maximised that loss), the monitor and its best score stand
    beside it."""
    import json

    from finetune.train import OPTIMIZABLE, objective, train
    from tests.conftest import TINY, compose_config

    cfg = compose_config(tmp_path, [*TINY, "strategy=freeze", "trainer.max_epochs=3",
                                    "callbacks.model_checkpoint.monitor=val/loss",
                                    "callbacks.model_checkpoint.mode=min"])
    metrics = train(cfg)
    with open(next(tmp_path.glob("**/metrics.csv")), newline="") as handle:
        logged = [record for record in csv.DictReader(handle) if record.get("val/acc")]
    assert len(logged) == 3
    assert metrics["best_val_acc"] == pytest.approx(max(float(r["val/acc"]) for r in logged))
    assert metrics["best_val_loss"] == pytest.approx(min(float(r["val/loss"]) for r in logged), rel=1e-6)
    assert metrics["monitor"] == "val/loss" and metrics["best_score"] == pytest.approx(metrics["best_val_loss"])
    assert json.loads((tmp_path / "metrics.json").read_text())["best_val_acc"] == metrics["best_val_acc"]
    assert OPTIMIZABLE["val/acc"] == "best_val_acc" and objective(cfg, metrics) == metrics["best_val_acc"]
