"""Any torchvision classification model by name, through `torchvision.models.get_model` and its weights enum."""

from __future__ import annotations

import torch
import torchvision
from torch import nn

from finetune.backbones.base import Backbone, network_error_types
from finetune.errors import ConfigError, OfflineError


def classifier_name(model: nn.Module) -> str:
    """Where a torchvision model keeps its classifier: its last Linear layer (fc, classifier.1, heads.head ...)."""
    names = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if not names:
        raise ConfigError(f"{type(model).__name__} has no Linear classifier")
    return names[-1]


def _replace_classifier(model: nn.Module) -> int:
    """Swap the classifier for Identity; return its input width."""
    last_name = classifier_name(model)
    last = model.get_submodule(last_name)
    parent_name, _, child = last_name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, nn.Identity())
    return last.in_features


def build(name: str, pretrained: bool = False, weights: str = "DEFAULT", checkpoint_path: str | None = None) -> Backbone:
    available = torchvision.models.list_models(module=torchvision.models)
    if name not in available:
        raise ConfigError(f"backbone.name={name!r} is not a torchvision classification model; choose one of: "
                          + ", ".join(sorted(available)))
    weights_enum = torchvision.models.get_model_weights(name)
    try:
        chosen = weights_enum[weights] if weights != "DEFAULT" else weights_enum.DEFAULT
    except KeyError:
        raise ConfigError(f"backbone.weights={weights!r} is not among {name}'s weights; choose one of: DEFAULT, "
                          + ", ".join(w.name for w in weights_enum)) from None
    want_hub = pretrained and not checkpoint_path
    try:
        model = torchvision.models.get_model(name, weights=chosen if want_hub else None)
    except network_error_types() as err:
        if not want_hub:
            raise
        raise OfflineError(
            f"could not download torchvision weights {chosen} ({type(err).__name__}); offline? pass a local file "
            f"with backbone.checkpoint_path=/path/to/weights.pth or train from scratch with backbone.pretrained=false"
        ) from err
    if checkpoint_path:
        model.load_state_dict(torch.load(checkpoint_path, map_location="cpu", weights_only=True), strict=True)
    num_features = _replace_classifier(model)
    return Backbone(model=model, name=f"torchvision/{name}", num_features=num_features,
                    data_config=preset_data_config(chosen))


def preset_data_config(weights: torchvision.models.WeightsEnum) -> dict:
    """The weights' eval preset in timm's data_config keys: resize to `resize_size`, centre-crop `crop_size`
    (256 -> 224 for IMAGENET1K_V1, 232 -> 224 for the V2 recipes), so crop_pct = crop / resize."""
    preset = weights.transforms()  # metadata only: building it downloads nothing
    crop, resize = preset.crop_size[0], preset.resize_size[0]
    return {"input_size": (3, crop, crop), "crop_pct": crop / resize, "mean": tuple(preset.mean),
            "std": tuple(preset.std), "interpolation": preset.interpolation.value}
