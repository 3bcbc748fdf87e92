"""Any timm model by name: hub weights (online), a local checkpoint, or random init."""

from __future__ import annotations

import timm

from finetune.backbones.base import Backbone, network_error_types
from finetune.errors import ConfigError, OfflineError


def build(name: str, pretrained: bool = False, checkpoint_path: str | None = None, **model_kwargs) -> Backbone:
    if name not in timm.list_models() and name.split(".")[0] not in timm.list_models():
        raise ConfigError(f"backbone.name={name!r} is not a timm model; see timm.list_models() for the choices")
    want_hub = pretrained and not checkpoint_path
    try:
        model = timm.create_model(name, pretrained=want_hub, **model_kwargs)
    except network_error_types() as err:
        if not want_hub:
            raise
        raise OfflineError(
            f"could not download timm weights for {name!r} ({type(err).__name__}); offline? pass a local file with "
            f"backbone.checkpoint_path=/path/to/weights.pth or train from scratch with backbone.pretrained=false"
        ) from err
    if checkpoint_path:
        # Loaded before the classifier is dropped, so a file holding a whole classifier loads strictly.
        timm.models.load_checkpoint(model, checkpoint_path, strict=True)
    model.reset_classifier(0)
    return Backbone(model=model, name=name, num_features=pooled_width(model),
                    data_config=timm.data.resolve_model_data_config(model))


def pooled_width(model) -> int:
    """The width of what the model returns with num_classes=0, which the head takes: timm's head_hidden_size where
    the model has a head of its own before the classifier (MobileNetV3/V4, GhostNet: num_features is the width
    before that head's conv), else num_features."""
    return int(getattr(model, "head_hidden_size", None) or model.num_features)
