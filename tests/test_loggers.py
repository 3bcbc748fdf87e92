"""logger=many_loggers logs one real run to CSV, TensorBoard, MLflow and W&B (offline); each store is read back
with its own library (or file format) and holds the run config and the same per-epoch val/acc as the CSV."""

from __future__ import annotations

import csv
import struct
from pathlib import Path

import pytest
from lightning.fabric.utilities.imports import RequirementCache

from finetune.errors import ConfigError
from finetune.train import train
from tests.conftest import TINY, compose_config

EPOCHS = 2


def csv_val_acc(run_dir: Path) -> list[float]:
    rows = list(csv.DictReader((run_dir / "csv" / "metrics.csv").open()))
    return [float(r["val/acc"]) for r in rows if r.get("val/acc")]


def tensorboard_logged(run_dir: Path) -> tuple[dict, list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    start = HParamsPluginData.FromString(events.PluginTagToContent("hparams")["_hparams_/session_start_info"])
    hparams = {name: value.string_value or value.number_value
               for name, value in start.session_start_info.hparams.items()}
    return hparams, [e.value for e in events.Scalars("val/acc")]


def mlflow_logged(log_dir: Path) -> tuple[dict, list[float]]:
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{log_dir}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("finetune").experiment_id])
    history = sorted(client.get_metric_history(run.info.run_id, "val/acc"), key=lambda m: m.step)
    return run.data.params, [m.value for m in history]


def wandb_records(path: Path):
    """The protobuf records of an offline run file: LevelDB's log format (32 KiB blocks of checksum, length, type,
    data; types 1 full, 2 first, 3 middle, 4 last) after W&B's 7-byte header."""
    raw, position, pending = path.read_bytes(), 7, b""
    while position + 7 <= len(raw):
        if 32768 - position % 32768 < 7:  # a block's tail too short for a header is padding
            position += 32768 - position % 32768
            continue
        _, length, kind = struct.unpack("<IHB", raw[position:position + 7])
        data, position = raw[position + 7:position + 7 + length], position + 7 + length
        if kind == 0 and length == 0:
            break
        pending = data if kind in (1, 2) else pending + data
        if kind in (1, 4):
            yield pending


def wandb_logged(run_dir: Path) -> tuple[dict, list[float]]:
    import json

    from wandb.proto.wandb_internal_pb2 import Record

    (path,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    config, val_acc = {}, []
    for data in wandb_records(path):
        record = Record.FromString(data)
        if record.WhichOneof("record_type") == "config":
            config.update({item.key: json.loads(item.value_json) for item in record.config.update})
        elif record.WhichOneof("record_type") == "history":
            # W&B writes a key with a "/" as nested parts: val/acc arrives as ["val", "acc"]
            values = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            if "val/acc" in values:
                val_acc.append(values["val/acc"])
    return config, val_acc


def test_many_loggers_log_the_config_and_the_same_metrics_to_every_store(tmp_path):
    for package in ("tensorboard", "mlflow", "wandb"):
        pytest.importorskip(package)
    cfg = compose_config(tmp_path, [*TINY, "logger=many_loggers", f"trainer.max_epochs={EPOCHS}", "strategy=freeze",
                                    "optimizer.lr=3e-3", "trainer.log_every_n_steps=1"])
    train(cfg)
    expected = csv_val_acc(tmp_path)
    assert len(expected) == EPOCHS

    hparams, logged = tensorboard_logged(tmp_path)
    assert hparams["strategy/_target_"] == "finetune.strategies.FreezeBackbone"
    assert hparams["optimizer/lr"] == pytest.approx(3e-3)
    assert logged == pytest.approx(expected)

    params, logged = mlflow_logged(tmp_path)
    assert params["strategy/_target_"] == "finetune.strategies.FreezeBackbone" and float(params["optimizer/lr"]) == 3e-3
    assert logged == pytest.approx(expected)

    config, logged = wandb_logged(tmp_path)
    assert config["strategy"]["_target_"] == "finetune.strategies.FreezeBackbone"
    assert config["optimizer"]["lr"] == 3e-3
    assert logged == pytest.approx(expected)


def test_a_logger_whose_package_is_missing_names_its_extra(tmp_path, monkeypatch):
    import lightning.pytorch.loggers.mlflow as lightning_mlflow

    monkeypatch.setattr(lightning_mlflow, "_MLFLOW_AVAILABLE", RequirementCache("mlflow-not-installed-here>=1"))
    cfg = compose_config(tmp_path, [*TINY, "logger=mlflow"])
    with pytest.raises(ConfigError, match=r"logger.mlflow needs a package that is not installed \(.*\); "
                                          r"pip install 'finetune\[mlflow\]'"):
        train(cfg)
