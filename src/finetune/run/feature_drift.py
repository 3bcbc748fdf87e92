"""How far fine-tuning moved the backbone's features: 1 - mean cosine similarity between the pretrained and the
trained backbone's features on the test split (eval transforms, eval mode). 0 for a backbone fit left unchanged."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from finetune.data.base import ImageDataModule
from finetune.data.features.extraction import iter_features
from finetune.run.progress import Progress


def feature_drift(backbone: torch.nn.Module, pretrained_state: dict[str, torch.Tensor], images: ImageDataModule,
                  batch_size: int = 256, split: str = "test") -> float:
    """`pretrained_state`: the backbone's state_dict as built (the freeze audit's baseline, without `backbone.`).
    Streams both backbones over the split a batch at a time: memory O(batch), whatever the split's size."""
    trained_state = backbone.state_dict()
    if all(torch.equal(pretrained_state[name], tensor.detach().cpu()) for name, tensor in trained_state.items()):
        return 0.0  # the same weights give the same features: exactly no drift, no pass over the data needed
    pretrained = copy.deepcopy(backbone)
    pretrained.load_state_dict(pretrained_state)
    device = next(backbone.parameters()).device
    indices = torch.arange(len(images.split_dataset(split)))
    total, count = torch.zeros((), dtype=torch.float64, device=device), 0
    passes = [iter_features(model, images, split, indices, batch_size, device, torch.float32)
              for model in (pretrained, backbone)]
    with Progress(f"feature drift on {split}", len(indices), unit="images") as progress:
        for (before, _), (after, _) in zip(*passes):
            total += F.cosine_similarity(before, after, dim=1).sum(dtype=torch.float64)
            count += len(before)
            progress.advance(len(before))
    return float(1 - total.item() / max(count, 1))
