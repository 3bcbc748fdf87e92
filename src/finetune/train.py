"""finetune-train: compose the config, build data, backbone, strategy and trainer, fit, test, write results."""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import secrets
import sys
from pathlib import Path

import hydra
import lightning as L
import torch
from omegaconf import DictConfig, open_dict

from finetune.build import build, instantiate_all
from finetune.callbacks import FreezeAudit, RunMeter
from finetune.search.pruning import trial_callbacks
from finetune.config import CONFIG_DIR, instantiate
from finetune.run.failures import report_user_errors
from finetune.run.distributed import ddp_ranks_join_this_job, seed_of_rank_zero
from finetune.errors import ConfigError
from finetune.run.feature_drift import feature_drift
from finetune.run.identity import digest
from finetune.run.lightning_internals import wandb_run_started

log = logging.getLogger("finetune")
PREDICTIONS_FILE = "predictions.csv"


DRAWN_SEED_ENV = "FINETUNE_DRAWN_SEED"


def resolve_seed(cfg: DictConfig) -> bool:
    """seed=null: draw a seed, log it and put it in the config (the data seeds and metrics.json read it from there).
    DDP ranks started by this process inherit it through the environment, so every rank draws the same; ranks that
    torchrun or SLURM started take rank 0's draw in `_train` (seed_of_rank_zero). Returns whether this process
    drew it."""
    if cfg.get("seed") is not None:
        return False
    inherited = os.environ.get(DRAWN_SEED_ENV)
    seed = int(inherited) if inherited else secrets.randbelow(2**31)
    with open_dict(cfg):
        cfg.seed = seed
    if not inherited:
        os.environ[DRAWN_SEED_ENV] = str(seed)
    return not inherited


def train(cfg: DictConfig) -> dict:
    drew_seed = resolve_seed(cfg)
    try:
        return _train(cfg, drew_seed)
    finally:
        if drew_seed:  # the next job of a sweep in this process draws its own
            os.environ.pop(DRAWN_SEED_ENV, None)


def _train(cfg: DictConfig, drew_seed: bool = False) -> dict:
    # an Optuna trial (hydra/sweeper=optuna put it in this job's environment) reports and may be pruned
    callbacks = instantiate_all(cfg.get("callbacks")) + trial_callbacks(cfg.get("optimized_metric") or "val/acc",
                                                                        cfg.paths.output_dir)
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks,
                                     logger=instantiate_all(cfg.get("logger"), "logger") or False)
    if drew_seed:
        with open_dict(cfg):
            cfg.seed = seed_of_rank_zero(trainer, cfg.seed)
        os.environ[DRAWN_SEED_ENV] = str(cfg.seed)
        if trainer.is_global_zero:
            log.info("seed=null: drew seed=%d (metrics.json records it; pass seed=%d to repeat this run)",
                     cfg.seed, cfg.seed)
    L.seed_everything(cfg.seed, workers=True)
    if torch.cuda.is_available():
        torch.set_float32_matmul_precision(cfg.get("float32_matmul_precision", "high"))
    datamodule, module = build(cfg)
    if not any(isinstance(c, FreezeAudit) for c in trainer.callbacks):  # feature_drift needs the weights as built
        module._pretrained_backbone = {n: t.detach().cpu().clone() for n, t in module.backbone.state_dict().items()}
    try:
        with ddp_ranks_join_this_job(trainer):
            trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
            last_val = trainer.callback_metrics.get("val/acc")
            tested = None
            if cfg.get("test", True):  # test=false: fit only (a tuning trial: the test split stays unread)
                tested = trainer.test(module, datamodule=datamodule, ckpt_path=_best_or_current(trainer),
                                      verbose=False)
            predictions = module.test_prediction_rows() if tested else None  # every rank: it gathers
    finally:
        finish_tracker_runs(trainer.loggers)
    metrics = _run_metrics(cfg, trainer, module, datamodule, tested[0] if tested else {}, last_val)
    if trainer.is_global_zero:
        output_dir = Path(cfg.paths.output_dir)
        # what the strategy keeps of the tested weights (trainer.test loaded them): the peft strategies' adapter
        metrics.update(module.strategy.write_outputs(module, output_dir))
        if predictions is not None:
            metrics.update(write_predictions(predictions, output_dir, getattr(datamodule, "images", datamodule)))
        (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=1))
        val = float("nan") if metrics["best_val_acc"] is None else metrics["best_val_acc"]
        tested_line = f"test accuracy {metrics['test_acc']:.4f}" if metrics["tested"] else "not tested (test=false)"
        print(f"{tested_line} (best val {val:.4f}, "
              f"strategy={metrics['strategy']}, {metrics['fit_seconds']:.1f}s fit)\nrun directory: {output_dir}")
    return metrics


def write_predictions(rows: torch.Tensor, output_dir: Path, images) -> dict:
    """predictions.csv: the test split per sample (index, label, predicted, probability of the label), so that any
    two runs on one split can be compared pairwise; returns what metrics.json records of it (`test_split_id`
    identifies the split: the data's identity and the labels in index order)."""
    with open(output_dir / PREDICTIONS_FILE, "w") as handle:
        handle.write("index,label,predicted,p_label\n")
        for index, label, predicted, p_label in rows.tolist():
            handle.write(f"{int(index)},{int(label)},{int(predicted)},{p_label:.6g}\n")
    split_id = digest(getattr(images, "dataset_id", None), data=rows[:, 1].long().numpy().tobytes())
    return {"predictions": PREDICTIONS_FILE, "test_split_id": split_id, "test_samples": len(rows)}


def finish_tracker_runs(loggers: list) -> None:
    """W&B keeps its run open until the process exits: finish it, so that the next job of a sweep in this process (an
    Optuna trial) starts a run of its own instead of logging into this one."""
    from lightning.pytorch.loggers import WandbLogger

    for logger in loggers:
        if isinstance(logger, WandbLogger) and wandb_run_started(logger):
            logger.experiment.finish()


def _best_or_current(trainer: L.Trainer) -> str | None:
    """The monitored checkpoint's best file (the first ModelCheckpoint: LastCheckpoint keeps no best), else the
    weights as they are."""
    checkpoint = trainer.checkpoint_callback
    return checkpoint.best_model_path if checkpoint is not None and checkpoint.best_model_path else None


def _run_metrics(cfg, trainer, module, datamodule, tested: dict, last_val) -> dict:
    meter = next((c for c in trainer.callbacks if isinstance(c, RunMeter)), RunMeter())
    images = getattr(datamodule, "images", datamodule)
    checkpoint = trainer.checkpoint_callback
    trainable = sum(p.numel() for _, p in module.strategy.trainable_parameters(module))
    total = sum(p.numel() for p in module.parameters())
    metrics = {
        "strategy": module.strategy.name,
        "seed": cfg.get("seed"),
        "backbone": module.backbone_name,
        "data": cfg.data._target_.rsplit(".", 1)[-1],
        # the best of the logged val/acc and val/loss; the checkpoint callback's monitor and its best score beside
        # them (the tested checkpoint is the monitor's best)
        "best_val_acc": module.best_val.get("acc"),
        "best_val_loss": module.best_val.get("loss"),
        "last_val_acc": float(last_val) if last_val is not None else None,
        "monitor": getattr(checkpoint, "monitor", None),
        "best_score": float(checkpoint.best_model_score) if getattr(checkpoint, "best_model_score", None) is not None
        else None,
        "tested": bool(cfg.get("test", True)),
        "test_acc": float(tested.get("test/acc", float("nan"))),
        "test_loss": float(tested.get("test/loss", float("nan"))),
        "fit_seconds": round(meter.fit_seconds, 3),
        "train_samples_per_second": round(meter.train_samples_per_second, 1),
        "train_samples": meter.train_samples,
        "peak_memory_mb": round(meter.peak_memory_mb, 1),
        "trainable_params": trainable,
        "total_params": total,
        "trainable_percent": round(100 * trainable / total, 4),
        "epochs": trainer.current_epoch,
        "image_size": getattr(images, "image_size", None),
        "test_split": getattr(images, "test_split", "test"),
        "precision": str(trainer.precision),
        "device": str(module.device),
        "best_checkpoint": checkpoint.best_model_path if checkpoint is not None else None,
    }
    if hasattr(datamodule, "report"):  # cached: what extraction cost and whether the cache served it
        report = datamodule.report
        metrics.update(extract_seconds=round(report["extract_seconds"], 3), cache_hit=report["cache_hit"],
                       rows_extracted=report["rows_extracted"],
                       extract_peak_memory_mb=round(report["extract_peak_memory_mb"], 1),
                       peak_memory_mb=round(max(meter.peak_memory_mb, report["extract_peak_memory_mb"]), 1))
    store = getattr(images, "store", None)
    if store is not None:  # data.store: the images this run decoded into it (0 when another run built it)
        metrics.update(images_decoded=store.report["images_decoded"],
                       store_build_seconds=round(store.report["store_build_seconds"], 3))
    audit = next((c for c in trainer.callbacks if isinstance(c, FreezeAudit)), None)
    if audit is not None and audit.report is not None:
        metrics["audit_violations"] = len(audit.report["violations"])
        metrics["phases"] = len(audit.report["phases"])
    if audit is not None and hasattr(audit, "initial"):
        pretrained = {n[len("backbone."):]: t for n, t in audit.initial.items() if n.startswith("backbone.")}
    else:  # callbacks=none: the snapshot train() took before fit
        pretrained = getattr(module, "_pretrained_backbone", None)
    if pretrained is not None and trainer.is_global_zero:
        metrics["feature_drift"] = round(feature_drift(module.backbone, pretrained, images,
                                                       getattr(images, "eval_batch_size", 256)), 6)
    return metrics


# what optimized_metric may name, and where metrics.json keeps it
OPTIMIZABLE = {"val/acc": "best_val_acc", "val/loss": "best_val_loss", "test/acc": "test_acc",
               "test/loss": "test_loss"}


def objective(cfg: DictConfig, metrics: dict | None = None) -> float | None:
    """The value of `optimized_metric` (default val/acc) a run returns to a Hydra sweeper such as Optuna's; None
    (a failed trial) when it is not a finite number. Without `metrics`, only checks the name."""
    name = cfg.get("optimized_metric") or "val/acc"
    if name not in OPTIMIZABLE:
        raise ConfigError(f"optimized_metric={name!r}; choose one of: {', '.join(OPTIMIZABLE)}")
    if name.startswith("test/") and not cfg.get("test", True):
        raise ConfigError(f"optimized_metric={name} needs the test split, which test=false leaves unread; choose "
                          f"val/acc or val/loss")
    value = metrics.get(OPTIMIZABLE[name]) if metrics is not None else None
    return float(value) if value is not None and math.isfinite(value) else None


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
@report_user_errors
def run(cfg: DictConfig) -> float | None:
    objective(cfg)  # a misspelt metric fails before any training
    return objective(cfg, train(cfg))


def main() -> None:
    """finetune-train. Our Optuna sweeper (hydra/sweeper=optuna) needs optuna; say which extra brings it."""
    searches = [a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("hparams_search=")]
    if any(s != "null" for s in searches) and importlib.util.find_spec("optuna") is None:
        print(f"error: hparams_search={searches[-1]} needs optuna, which is not installed: "
              f"pip install 'finetune[search]'", file=sys.stderr)
        sys.exit(2)
    run()


if __name__ == "__main__":
    main()
