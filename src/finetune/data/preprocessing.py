"""How an image becomes model input, written once: the datamodules' eval path, `load_model`, finetune-predict and the
JSON beside an exported model all follow it, so a trained model sees at prediction time the pixels it was tested on.

Two steps. `eval_geometry` (per image, on the CPU) gives a uint8 [C, h, w] tensor: image files are resized on the
shorter side to floor(size / crop_pct) and centre-cropped to size x size (timm's and torchvision's eval transform);
in-memory datasets (digits, fake) keep their native size. `to_model_input` (per batch, on any device) scales to
[0, 1], makes grey images RGB, resizes the whole image to size x size if it is not already, and normalises.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2

from finetune.errors import ConfigError

ImageLike = Union[str, Path, Image.Image, torch.Tensor, np.ndarray]

def eval_resize_size(size: int, crop_pct: float) -> int:
    """The shorter side before the centre crop: timm's floor(size / crop_pct), tolerant of a crop_pct stored as
    crop / resize (224 / 232 must give back 232, not 231.99...)."""
    return math.floor(size / crop_pct + 1e-6)


def eval_geometry(preprocessing: dict[str, Any]) -> v2.Compose:
    """PIL image or tensor -> uint8 [C, h, w]: size x size for "crop"; unchanged for "none" (to_model_input resizes)."""
    steps = [v2.ToImage()]
    if preprocessing.get("geometry", "crop") == "crop":
        size = preprocessing["image_size"]
        interpolation = InterpolationMode(preprocessing["interpolation"])
        steps += [v2.RGB(), v2.Resize(eval_resize_size(size, preprocessing["crop_pct"]), interpolation=interpolation,
                                      antialias=True), v2.CenterCrop(size)]
    return v2.Compose([*steps, v2.ToDtype(torch.uint8, scale=True)])


def to_model_input(images: torch.Tensor, preprocessing: dict[str, Any], mean: torch.Tensor,
                   std: torch.Tensor) -> torch.Tensor:
    """uint8 (or [0, 1] float) [B, 1|3, h, w] on any device -> normalised float [B, 3, S, S] on the same device.
    `mean`/`std` are [1, 3, 1, 1] tensors already on that device (a copy per batch would synchronise a GPU)."""
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    size = preprocessing["image_size"]
    if images.dtype == torch.uint8 and images.shape[-2:] == (size, size):
        # one conversion (to the usual NCHW layout, whatever the input's) and one affine pass: x / 255 folded into
        # the normalisation; 2-3x the four passes of float, /255, -mean, /std on the CPU
        scaled = images.to(torch.float32, memory_format=torch.contiguous_format).mul_(std.mul(255).reciprocal_())
        return scaled.sub_(mean / std)
    if images.dtype == torch.uint8:
        images = images.float().div_(255)
    if images.shape[-2:] != (size, size):
        mode = preprocessing["interpolation"]
        smooth = mode != "nearest"
        images = F.interpolate(images, size=(size, size), mode=mode, antialias=smooth,
                               align_corners=False if smooth else None)
    return (images - mean) / std


def normalisation_tensors(preprocessing: dict[str, Any], device: torch.device | str = "cpu"):
    """(mean, std) as [1, 3, 1, 1] float tensors on `device`."""
    return tuple(torch.tensor(preprocessing[name], dtype=torch.float32).view(1, 3, 1, 1).to(device)
                 for name in ("mean", "std"))


class CorruptImageError(ConfigError):
    """An image file that PIL cannot decode; the message names it."""


def load_rgb(path: str) -> Image.Image:
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise CorruptImageError(f"cannot read image {path}: {err}") from None


class Preprocessor:
    """One raw image -> the normalised float [3, S, S] a model takes, on the CPU (small enough to send to DataLoader
    workers). A path is decoded by PIL (CorruptImageError names an unreadable file); arrays are H x W [x C] uint8."""

    def __init__(self, preprocessing: dict[str, Any]):
        self.preprocessing = dict(preprocessing)
        self.geometry = eval_geometry(self.preprocessing)
        self.mean, self.std = normalisation_tensors(self.preprocessing)

    def __call__(self, image: ImageLike) -> torch.Tensor:
        if isinstance(image, (str, Path)):
            image = load_rgb(str(image))
        elif isinstance(image, np.ndarray):
            image = torch.from_numpy(np.ascontiguousarray(image))
            image = image.permute(2, 0, 1) if image.ndim == 3 else image
        if isinstance(image, torch.Tensor):
            if image.ndim == 2:
                image = image[None]
            if image.ndim != 3 or image.shape[0] not in (1, 3):
                raise ConfigError(f"an image tensor must be [C, H, W] or [H, W] with C 1 or 3, got "
                                  f"{list(image.shape)}; pass a batch as a list or a [B, C, H, W] tensor")
            if image.is_floating_point() and float(image.max()) > 1:
                raise ConfigError("a float image tensor must hold values in [0, 1]; pass uint8 for 0..255")
        elif not isinstance(image, Image.Image):
            raise ConfigError(f"cannot read an image from a {type(image).__name__}; pass a path, a PIL image, "
                              f"a uint8 tensor [C, H, W] or an array [H, W, C]")
        pixels = self.geometry(image)
        return to_model_input(pixels[None], self.preprocessing, self.mean, self.std)[0]
