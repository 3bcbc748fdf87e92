"""Use a trained model: `load_model(ckpt_path)` gives a Classifier that takes raw images (paths, PIL images, uint8
tensors or arrays) and returns class probabilities with names. Its preprocessing is the one the model was tested
with, read from the checkpoint (finetune.data.preprocessing), so no datamodule and no training data are needed.

    from finetune import load_model
    model = load_model("logs/train/runs/<run>/checkpoints/epoch_009.ckpt")
    model.predict(["cat.jpg", "dog.png"], top_k=3)   # [[("cat", 0.91), ("dog", 0.06), ...], ...]
    model(["cat.jpg"])                                # tensor [1, num_classes] of probabilities
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from finetune.config import instantiate
from finetune.data.preprocessing import ImageLike, Preprocessor
from finetune.errors import ConfigError
from finetune.module import FinetuneModule


def read_checkpoint(ckpt_path: str | Path) -> dict:
    """A checkpoint written by finetune-train (it carries the run config), loaded on the CPU."""
    path = Path(ckpt_path)
    if not path.is_file():
        raise ConfigError(f"ckpt_path={ckpt_path} does not exist")
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    if (checkpoint.get("finetune") or {}).get("config") is None:
        raise ConfigError(f"{ckpt_path} was not written by finetune-train (it holds no run config)")
    return checkpoint


def without_weights(backbone_cfg) -> dict:
    """Overrides that build a backbone's architecture without downloading or reading weights (a checkpoint has them)."""
    return {key: value for key, value in (("pretrained", False), ("checkpoint_path", None)) if key in backbone_cfg}


def load_module(ckpt_path: str | Path) -> FinetuneModule:
    """The trained FinetuneModule of a checkpoint, in eval mode on the CPU, built without its training data."""
    from finetune.build import build_module

    checkpoint = read_checkpoint(ckpt_path)
    saved = checkpoint["finetune"]
    cfg = OmegaConf.create(saved["config"])
    cfg.compile = False
    backbone = instantiate(cfg.backbone, **without_weights(cfg.backbone))
    class_names, preprocessing = saved.get("class_names"), saved.get("preprocessing")
    if class_names is None or preprocessing is None:  # written before checkpoints carried them: ask the data config
        images = instantiate(cfg.data)
        images.configure_preprocessing(backbone.data_config)
        class_names, preprocessing = images.class_names, images.inference_preprocessing()
    module = build_module(cfg, backbone, instantiate(cfg.strategy), class_names, preprocessing)
    module.load_state_dict(checkpoint["state_dict"], strict=True)
    return module.eval()


class Classifier:
    """A trained model with its preprocessing and class names; call it on images for probabilities."""

    def __init__(self, module: FinetuneModule, device: str | torch.device | None = None):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.module = module.to(self.device).eval()
        self.class_names: list[str] = list(module.class_names)
        self.preprocess = Preprocessor(module.preprocessing)  # one image -> normalised [3, S, S]
        self.preprocessing: dict[str, Any] = self.preprocess.preprocessing

    def batch(self, images: ImageLike | Sequence[ImageLike]) -> torch.Tensor:
        """Images -> a normalised float batch [B, 3, S, S] on the model's device."""
        if isinstance(images, torch.Tensor) and images.ndim == 4:
            images = list(images)
        elif not isinstance(images, (list, tuple)):
            images = [images]
        return torch.stack([self.preprocess(image) for image in images]).to(self.device)

    @torch.inference_mode()
    def logits(self, inputs: torch.Tensor) -> torch.Tensor:
        """Normalised inputs [B, 3, S, S] -> logits [B, K]: the backbone runs on images, whatever the strategy."""
        return self.module(inputs.to(self.device))

    def probabilities(self, inputs: torch.Tensor) -> torch.Tensor:
        """Normalised inputs [B, 3, S, S] -> class probabilities [B, K] on the CPU, in the order of `class_names`."""
        return self.logits(inputs).float().softmax(dim=-1).cpu()

    def __call__(self, images: ImageLike | Sequence[ImageLike]) -> torch.Tensor:
        """Class probabilities [N, K] (on the CPU) of raw images, in the order of `class_names`."""
        return self.probabilities(self.batch(images))

    def predict(self, images: ImageLike | Sequence[ImageLike], top_k: int = 5) -> list[list[tuple[str, float]]]:
        """For each image, its `top_k` (class name, probability) pairs, most likely first."""
        return self.top_k(self(images), top_k)

    def top_k(self, probabilities: torch.Tensor, k: int) -> list[list[tuple[str, float]]]:
        values, indices = probabilities.topk(min(int(k), len(self.class_names)), dim=-1)
        return [[(self.class_names[i], float(p)) for p, i in zip(row_p.tolist(), row_i.tolist())]
                for row_p, row_i in zip(values, indices)]


def load_model(ckpt_path: str | Path, device: str | torch.device | None = None) -> Classifier:
    """The model a finetune-train checkpoint holds, ready for raw images, on the GPU when there is one."""
    return Classifier(load_module(ckpt_path), device)
