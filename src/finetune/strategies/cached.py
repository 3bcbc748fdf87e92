"""cached: backbone features are computed once (eval mode, inference mode, eval transforms), detached, stored on
disk and reused; only the head trains, on feature tensors batched by index. The backbone is frozen and never runs
during fit, but stays in the checkpoint so evaluation and prediction work on raw images."""

from __future__ import annotations

import logging

import torch
from torch import nn

from finetune.data.storage.epoch_order import check_epoch_order
from finetune.errors import ConfigError
from finetune.strategies.base import FreezingStrategy, names_under

log = logging.getLogger(__name__)


class CachedFeatures(FreezingStrategy):
    name = "cached"
    # finetune-compare's tuning tries these search_space keys with the head grid: every configuration's head at
    # once, in one pass over the cached features (compare/head_grid.py), for trainer.max_epochs epochs
    head_grid_keys = {"optimizer.lr": "lr", "optimizer.weight_decay": "weight_decay"}
    head_grid_epochs_key = "trainer.max_epochs"

    def __init__(self, cache_dir: str = "feature_cache", feature_dtype: str = "float32",
                 extract_batch_size: int = 256, batch_size: int | None = None, device_max_bytes: int = 4 * 1024**3,
                 shard_rows: int | None = None, epoch_order: str = "auto", window_bytes: int | None = None):
        if feature_dtype not in ("float32", "float16", "bfloat16"):
            raise ConfigError(f"strategy.feature_dtype={feature_dtype!r}; choose one of: float32, float16, bfloat16")
        self.cache_dir = cache_dir
        self.feature_dtype = feature_dtype
        self.extract_batch_size = int(extract_batch_size)
        self.batch_size = batch_size  # head batches; None keeps the data's batch_size
        self.device_max_bytes = int(device_max_bytes)
        if shard_rows is not None and int(shard_rows) <= 0:
            raise ConfigError(f"strategy.shard_rows={shard_rows} must be a positive number of rows, or null (about "
                              f"256 MiB of features a shard)")
        self.shard_rows = None if shard_rows is None else int(shard_rows)
        if window_bytes is not None and int(window_bytes) <= 0:
            raise ConfigError(f"strategy.window_bytes={window_bytes} must be a positive number of bytes, or null (half the "
                              f"memory the job has left)")
        self.epoch_order, self.window_bytes = check_epoch_order(epoch_order), window_bytes

    def prepare(self, module) -> None:
        for param in module.backbone.parameters():
            param.requires_grad_(False)
        self.restore_eval_modes(module)

    def extract(self, backbone: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        if inputs.ndim == 2:  # already features from the cache
            return inputs
        with torch.no_grad():  # raw images at eval/predict time: the backbone is a fixed extractor
            return backbone(inputs)

    def eval_modules(self, module) -> list[nn.Module]:
        return list(module.backbone.modules())

    def frozen_names(self, module) -> set[str]:
        return names_under(module, ["backbone"])

    def wrap_datamodule(self, datamodule, module):
        from finetune.data.features.cached import CachedFeatureDataModule

        if getattr(datamodule, "has_random_train_augmentation", False):
            if datamodule.augment_requested:
                raise ConfigError(
                    f"strategy=cached stores each image's features once, so data.augment={datamodule.augment} would "
                    f"be frozen into one sample per image; drop the override (cached then trains without "
                    f"augmentation) or use strategy=freeze or no_grad")
            log.info("strategy=cached extracts train features with eval transforms: the default train augmentation "
                     "(%s) is off for it; strategy=freeze or no_grad train with it", datamodule.augment)
            datamodule.disable_augmentation()
        return CachedFeatureDataModule(datamodule, module, cache_dir=self.cache_dir, feature_dtype=self.feature_dtype,
                                       extract_batch_size=self.extract_batch_size, batch_size=self.batch_size,
                                       device_max_bytes=self.device_max_bytes, shard_rows=self.shard_rows,
                                       epoch_order=self.epoch_order, window_bytes=self.window_bytes)
