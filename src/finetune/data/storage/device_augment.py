"""Training augmentation for a whole batch on the training device: random-resized-crop and horizontal flip with
per-sample parameters, as torchvision's RandomResizedCrop (scale 0.08-1, ratio 3/4-4/3, ten tries, then a centre
crop) and RandomHorizontalFlip: one `torchvision.ops.roi_align` call on a GPU, F.interpolate per crop on the CPU.

Every random number is a pure function of (seed, epoch, sample index, draw): a counter-based hash, computed for the
whole batch at once on the device. So an epoch's crops do not depend on the batch they fall in, the number of
ranks, workers or a restart: a run killed mid-epoch and resumed sees the crops an uninterrupted run saw.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

ATTEMPTS = 10
MASK64 = (1 << 64) - 1


def _signed(value: int) -> int:
    """A 64-bit constant as torch's int64 holds it."""
    value &= MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


GOLDEN, MIX1, MIX2 = _signed(0x9E3779B97F4A7C15), _signed(0xBF58476D1CE4E5B9), _signed(0x94D049BB133111EB)


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical shift of int64 bit patterns (torch's >> is arithmetic on negative numbers)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def splitmix64(x: torch.Tensor) -> torch.Tensor:
    """SplitMix64's finaliser on int64 tensors (multiplication wraps modulo 2^64 on every device)."""
    x = x + GOLDEN
    x = (x ^ _shift_right(x, 30)) * MIX1
    x = (x ^ _shift_right(x, 27)) * MIX2
    return x ^ _shift_right(x, 31)


def uniform(seed: int, epoch: int, index: torch.Tensor, draw: int) -> torch.Tensor:
    """U[0, 1) per sample: a function of (seed, epoch, index, draw) only. float64 from the top 53 bits."""
    x = splitmix64(torch.full_like(index, _signed(seed)))
    x = splitmix64(x ^ _signed(epoch))
    x = splitmix64(x ^ index)
    x = splitmix64(x ^ _signed(draw))
    return _shift_right(x, 11).double() / float(1 << 53)


def crop_boxes(seed: int, epoch: int, index: torch.Tensor, height: int, width: int,
               scale: tuple[float, float] = (0.08, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3)):
    """(top, left, h, w) per sample, as torchvision's RandomResizedCrop.get_params draws them, for images of
    height x width; and whether to flip. All on index's device."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    found = torch.zeros_like(index, dtype=torch.bool)
    top = torch.zeros_like(index)
    left = torch.zeros_like(index)
    crop_h = torch.zeros_like(index)
    crop_w = torch.zeros_like(index)
    for attempt in range(ATTEMPTS):
        target = area * (scale[0] + (scale[1] - scale[0]) * uniform(seed, epoch, index, 5 * attempt))
        aspect = torch.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * uniform(seed, epoch, index, 5 * attempt + 1))
        w = torch.round(torch.sqrt(target * aspect)).long()
        h = torch.round(torch.sqrt(target / aspect)).long()
        ok = (w > 0) & (h > 0) & (w <= width) & (h <= height) & ~found
        i = (uniform(seed, epoch, index, 5 * attempt + 2) * (height - h + 1).clamp_min(1)).floor().long()
        j = (uniform(seed, epoch, index, 5 * attempt + 3) * (width - w + 1).clamp_min(1)).floor().long()
        top, left = torch.where(ok, i, top), torch.where(ok, j, left)
        crop_h, crop_w = torch.where(ok, h, crop_h), torch.where(ok, w, crop_w)
        found |= ok
    # torchvision's fallback: the whole image, cut to the nearest allowed ratio, centred
    in_ratio = width / height
    if in_ratio < min(ratio):
        fallback_w, fallback_h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        fallback_h, fallback_w = height, int(round(height * max(ratio)))
    else:
        fallback_w, fallback_h = width, height
    top = torch.where(found, top, torch.full_like(top, (height - fallback_h) // 2))
    left = torch.where(found, left, torch.full_like(left, (width - fallback_w) // 2))
    crop_h = torch.where(found, crop_h, torch.full_like(crop_h, fallback_h))
    crop_w = torch.where(found, crop_w, torch.full_like(crop_w, fallback_w))
    flip = uniform(seed, epoch, index, 5 * ATTEMPTS) < 0.5
    return top, left, crop_h, crop_w, flip


def random_resized_crop_flip(images: torch.Tensor, index: torch.Tensor, seed: int, epoch: int, size: int,
                             scale: tuple[float, float] = (0.08, 1.0),
                             ratio: tuple[float, float] = (3 / 4, 4 / 3), method: str = "auto") -> torch.Tensor:
    """[B, C, H, W] on any device -> [B, C, size, size] of the same dtype (uint8 in, uint8 out, as torchvision's
    transforms): each sample's crop resized and flipped. On a GPU one roi_align call for the batch (bilinear, averaged
    over every source pixel an output pixel covers); on the CPU each crop through F.interpolate (bilinear,
    antialiased, uint8 kernels: what torchvision's RandomResizedCrop does to a tensor), which there is several times
    faster than roi_align, and fastest on channels-last input (the image store's layout). `method`: auto (that
    choice), roi_align or interpolate."""
    batch, _, height, width = images.shape
    index = index.to(images.device, torch.long)
    top, left, crop_h, crop_w, flip = crop_boxes(seed, epoch, index, height, width, scale, ratio)
    if method == "auto":
        method = "interpolate" if images.device.type == "cpu" else "roi_align"
    if method == "interpolate":  # each crop flipped (a cheap copy of the small crop) before it is resized
        boxes = zip(*(t.tolist() for t in (top, left, crop_h, crop_w, flip)))
        crops = (images[i:i + 1, :, y:y + h, x:x + w] for i, (y, x, h, w, _) in enumerate(boxes))
        return torch.cat([F.interpolate(crop.flip(-1) if flipped else crop, size=(size, size), mode="bilinear",
                                        antialias=True, align_corners=False)
                          for crop, flipped in zip(crops, flip.tolist())])
    rois = torch.stack([torch.arange(batch, device=images.device), left, top, left + crop_w, top + crop_h],
                       dim=1).to(torch.float32)
    out = roi_align(images.float(), rois, output_size=(size, size), spatial_scale=1.0, sampling_ratio=-1,
                    aligned=True)
    out = torch.where(flip[:, None, None, None], out.flip(-1), out)
    return out.round_().clamp_(0, 255).to(torch.uint8) if images.dtype == torch.uint8 else out.to(images.dtype)
