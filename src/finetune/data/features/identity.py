"""What a feature-cache entry holds, as its key sees it: the backbone and its weights, the preprocessing, the data, the
dtype, how extraction runs (device, autocast, memory format) and the versions of the code that computes it. Any
change gives another key, so an entry never serves features another setting would not have produced."""

from __future__ import annotations

import inspect
from pathlib import Path

import torch

from finetune.config import auto_precision
from finetune.data import preprocessing
from finetune.data.base import ImageDataModule
from finetune.data.features.cache import weights_digest
from finetune.run.identity import package_version, source_digest

# A backbone-config key that says where weights came from, not what they are (the weights digest says that).
WEIGHT_SOURCE_KEYS = ("pretrained", "checkpoint_path", "weights")


def extraction_mode(device: torch.device, precision: str | None = None) -> dict:
    """How extraction runs on `device`: in the run's precision (trainer.precision: bf16-mixed or bf16-true under bf16
    autocast, 16-mixed or 16-true under fp16, 32-true and 64-true without autocast), as the run's own eval and
    predict do; channels_last on a GPU. Without a run (None): what precision=auto picks there. Part of the cache
    key: the same backbone gives other numbers in another mode."""
    precision = str(precision or auto_precision("gpu" if device.type == "cuda" else "cpu"))
    autocast = {"bf16": "bfloat16", "16": "float16"}.get(precision.split("-")[0])
    return {"device": device.type, "autocast": autocast, "channels_last": device.type == "cuda"}


def code_versions(images: ImageDataModule) -> dict:
    """Versions of the code that computes stored features: the libraries, and a digest of the source of the
    extraction, of the datamodule's classes and of data/preprocessing.py (eval geometry and normalisation), so editing any of
    them invalidates old entries."""
    import timm
    import torchvision

    sources = sorted({inspect.getsourcefile(cls) or "" for cls in type(images).__mro__
                      if not cls.__module__.startswith(("builtins", "lightning", "pytorch_lightning", "torch"))}
                     | {extraction_source(), __file__, preprocessing.__file__})
    return {"torch": torch.__version__, "torchvision": torchvision.__version__, "timm": timm.__version__,
            "finetune": package_version(), "source": source_digest(filter(None, sources))}


def extraction_source() -> str:
    """extraction.py, which computes the stored numbers (by path: it imports this module)."""
    return str(Path(__file__).with_name("extraction.py"))


def feature_identity(module, images: ImageDataModule, dtype: torch.dtype, device: torch.device,
                     precision: str | None) -> dict:
    """Everything that decides the stored numbers, but the split."""
    backbone_config = {k: v for k, v in ((module.run_config or {}).get("backbone") or {}).items()
                       if k not in WEIGHT_SOURCE_KEYS}
    return {"backbone": module.backbone_name, "backbone_config": backbone_config,
            "weights": weights_digest(module.backbone), "preprocessing": images.preprocessing,
            "dataset": images.dataset_id, "image_source": getattr(images, "image_source", "memory"),
            "dtype": str(dtype), "extraction": extraction_mode(device, precision), "code": code_versions(images)}
