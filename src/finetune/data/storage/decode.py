"""Batched decoding for the image store's one pass over the files: JPEGs by torchvision's `decode_jpeg` on a list of
files at once (nvJPEG on a GPU, libjpeg-turbo on the CPU: the same pixels as PIL there), anything else (PNG, a
CMYK or progressive JPEG nvJPEG refuses, a broken file) by PIL, which names a file it cannot read.

torchvision 0.29 deprecates its decoders in favour of TorchCodec; they are used here because they ship with the
torchvision every install has, and the deprecation warning is silenced at the one call.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import torch
from torchvision import io as tvio
from torchvision.transforms import v2

from finetune.data.preprocessing import load_rgb

JPEG_MAGIC = b"\xff\xd8\xff"
DECODERS = ("auto", "pil", "torchvision")


def decode_device(decoder: str) -> torch.device | None:
    """Where `torchvision` decodes (the GPU where there is one); None for PIL in DataLoader workers. `auto`:
    torchvision on a GPU, PIL on a CPU-only machine (its workers decode in parallel; torchvision's CPU decode is
    one image at a time in this process)."""
    if decoder == "pil" or (decoder == "auto" and not torch.cuda.is_available()):
        return None
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def _read(path: str) -> torch.Tensor:
    with open(path, "rb") as handle:
        return torch.frombuffer(bytearray(handle.read()), dtype=torch.uint8)


def _decode_jpegs(data: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | None]:
    """Each JPEG decoded to uint8 [3, h, w] on `device`; None where the decoder refuses one (PIL tries it)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            return list(tvio.decode_jpeg(data, mode=tvio.ImageReadMode.RGB, device=device))
        except RuntimeError:  # one bad file fails the batch: decode one at a time to find it
            images: list[torch.Tensor | None] = []
            for item in data:
                try:
                    images.append(tvio.decode_jpeg(item, mode=tvio.ImageReadMode.RGB, device=device))
                except RuntimeError:
                    images.append(None)
            return images


def decoded_batches(samples: list[tuple[str, int]], transform: Callable[[torch.Tensor], torch.Tensor],
                    device: torch.device, batch_size: int = 64) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(uint8 [B, 3, s, s] on the CPU, int64 labels [B]) for `samples` (path, label) in order: files read by a few
    threads, JPEGs decoded a batch at a time on `device`, `transform` (the store's geometry) applied there."""
    to_image = v2.ToImage()
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        for start in range(0, len(samples), batch_size):
            paths, labels = zip(*samples[start:start + batch_size])
            data = list(pool.map(_read, paths))
            jpeg = [i for i, item in enumerate(data) if bytes(item[:3].tolist()) == JPEG_MAGIC]
            images: list[torch.Tensor | None] = [None] * len(paths)
            for i, image in zip(jpeg, _decode_jpegs([data[i] for i in jpeg], device) if jpeg else []):
                images[i] = image
            for i, image in enumerate(images):
                if image is None:  # not a JPEG, or one the decoder refused: PIL, which names a file it cannot read
                    images[i] = to_image(load_rgb(paths[i])).as_subclass(torch.Tensor).to(device)
            yield (torch.stack([transform(image) for image in images]).cpu(),
                   torch.tensor(labels, dtype=torch.int64))
