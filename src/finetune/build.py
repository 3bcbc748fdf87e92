"""What a run config builds: the image datamodule, the module (backbone, head, strategy, optimizer, schedule), the
datamodule training fits (the strategy's: `cached` serves stored features) and the callbacks and loggers. Used by
finetune-train, finetune-eval, finetune-predict (through the classifier) and the benchmarks."""

from __future__ import annotations

import lightning as L
from omegaconf import DictConfig, OmegaConf

from finetune.config import instantiate
from finetune.data import ImageDataModule
from finetune.errors import ConfigError
from finetune.module import FinetuneModule

LR_LAYOUT_KEYS = ("layer_decay", "lr_mult")


def build_images_and_module(cfg: DictConfig, backbone_overrides: dict | None = None,
                            data_overrides: dict | None = None) -> tuple[ImageDataModule, FinetuneModule]:
    """The image datamodule and the module a config describes, checked before any heavy work."""
    check_lr(cfg)
    strategy = instantiate(cfg.strategy)
    backbone = instantiate(cfg.backbone, **(backbone_overrides or {}))
    images = instantiate(cfg.data, **(data_overrides or {}))
    images.configure_preprocessing(backbone.data_config)
    backbone.check_input_size(images.image_size)
    module = build_module(cfg, backbone, strategy, images.class_names, images.inference_preprocessing())
    return images, module


def check_lr(cfg: DictConfig) -> None:
    lr = cfg.optimizer.get("lr") if cfg.get("optimizer") else None
    if lr is not None and not float(lr) > 0:
        raise ConfigError(f"optimizer.lr={lr} must be a positive number")


def build_module(cfg: DictConfig, backbone, strategy, class_names: list[str], preprocessing: dict) -> FinetuneModule:
    """The module of a run config around a built backbone and strategy (no data needed: load_model uses it too)."""
    # per-layer learning rates are ours, not the optimizer's keyword arguments
    optimizer = OmegaConf.masked_copy(cfg.optimizer, [k for k in cfg.optimizer if k not in LR_LAYOUT_KEYS])
    lr_layout = {k: OmegaConf.to_container(v) if OmegaConf.is_config(v) else v
                 for k, v in cfg.optimizer.items() if k in LR_LAYOUT_KEYS}
    return FinetuneModule(backbone=backbone, head=instantiate(cfg.head), strategy=strategy,
                          num_classes=len(class_names), optimizer=instantiate(optimizer),
                          scheduler=instantiate(cfg.scheduler), channels_last=cfg.get("channels_last", True),
                          compile=cfg.get("compile", False), run_config=OmegaConf.to_container(cfg, resolve=True),
                          class_names=class_names, preprocessing=preprocessing, **lr_layout)


def build(cfg: DictConfig) -> tuple[L.LightningDataModule, FinetuneModule]:
    """What training fits: the strategy decides where inputs come from (`cached` serves stored features)."""
    images, module = build_images_and_module(cfg)
    return module.strategy.wrap_datamodule(images, module), module


def instantiate_all(group: DictConfig | None, group_name: str = "callbacks") -> list:
    built = []
    for key, item in (group or {}).items():
        if item is None or "_target_" not in item:
            continue
        try:
            built.append(instantiate(item))
        except Exception as err:
            missing = missing_package(err)
            if missing is None:
                raise
            extra = f"pip install 'finetune[{key}]'" if key in OPTIONAL_EXTRAS else "install it"
            raise ConfigError(f"{group_name}.{key} needs a package that is not installed ({missing}); {extra}, or "
                              f"choose another {group_name}") from None
    return built


# loggers whose package is an optional extra of the same name (pyproject.toml)
OPTIONAL_EXTRAS = ("tensorboard", "mlflow", "wandb")


def missing_package(err: BaseException | None) -> str | None:
    """The first line of the ModuleNotFoundError behind `err` (Hydra wraps what a _target_ raised), if any."""
    while err is not None:
        if isinstance(err, ModuleNotFoundError):
            return str(err).strip().splitlines()[0] if str(err).strip() else "ModuleNotFoundError"
        err = err.__cause__ or err.__context__
    return None
