"""finetune-eval: test a checkpoint from any strategy on the raw images of a split.

The checkpoint carries the config it was trained with, so the backbone, head and data are rebuilt exactly; the
backbone is built without downloading weights (the checkpoint holds them) and runs on images even for `cached`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from finetune.classifier import read_checkpoint, without_weights
from finetune.config import CONFIG_DIR, instantiate
from finetune.run.failures import report_user_errors
from finetune.errors import ConfigError
from finetune.build import build_images_and_module

log = logging.getLogger("finetune")


def load_for_eval(ckpt_path: str, batch_size: int | None = None):
    """(module with the checkpoint's weights, image datamodule) for the run that wrote `ckpt_path`."""
    checkpoint = read_checkpoint(ckpt_path)
    cfg = OmegaConf.create(checkpoint["finetune"]["config"])
    # raw images, never the training-time feature cache: eval runs the backbone even for `cached`
    images, module = build_images_and_module(cfg, backbone_overrides=without_weights(cfg.backbone),
                                             data_overrides={"eval_batch_size": batch_size} if batch_size else None)
    module.load_state_dict(checkpoint["state_dict"], strict=True)
    return module, images


def evaluate(cfg: DictConfig) -> dict:
    module, images = load_for_eval(cfg.ckpt_path, cfg.get("batch_size"))
    trainer = instantiate(cfg.trainer, logger=False, callbacks=[], enable_checkpointing=False)
    if cfg.split == "test":
        results = trainer.test(module, datamodule=images, verbose=False)[0]
        accuracy = results["test/acc"]
    elif cfg.split == "val":
        results = trainer.validate(module, datamodule=images, verbose=False)[0]
        accuracy = results["val/acc"]
    else:
        raise ConfigError(f"split={cfg.split!r}; choose one of: test, val")
    metrics = {"ckpt_path": str(cfg.ckpt_path), "split": cfg.split, "strategy": module.strategy.name,
               f"{cfg.split}_acc": accuracy}
    output_dir = Path(cfg.paths.output_dir)
    (output_dir / "eval_metrics.json").write_text(json.dumps(metrics, indent=1))
    print(f"{cfg.split} accuracy {accuracy:.4f} ({module.strategy.name}, {cfg.ckpt_path})\nrun directory: {output_dir}")
    return metrics


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="eval")
@report_user_errors
def main(cfg: DictConfig) -> None:
    evaluate(cfg)


if __name__ == "__main__":
    main()
