"""What every backbone builder returns: a feature extractor plus the metadata the rest of the template reads."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from finetune.errors import ConfigError


@dataclass
class Backbone:
    """A model that maps images [B, 3, H, W] to pooled features [B, num_features].

    `data_config` follows timm's `resolve_model_data_config` keys: input_size (C, H, W), mean, std, interpolation.
    """

    model: nn.Module
    name: str
    num_features: int
    data_config: dict = field(default_factory=dict)

    @property
    def is_conv(self) -> bool:
        """Conv backbones benefit from channels_last on CUDA; transformers do not."""
        return any(isinstance(m, nn.Conv2d) and m.kernel_size != m.stride for m in self.model.modules())


    def check_input_size(self, image_size: int) -> None:
        """Fail before any heavy work if the model cannot take `image_size` or its width is not `num_features`."""
        was_training = self.model.training
        try:
            with torch.no_grad():
                features = self.model.eval()(torch.zeros(1, 3, image_size, image_size))
        except (RuntimeError, ValueError, AssertionError) as err:
            native = self.data_config.get("input_size", (3, "?", "?"))[-1]
            reason = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
            raise ConfigError(f"data.image_size={image_size} does not fit backbone {self.name} ({reason}); "
                              f"its native size is {native}") from None
        finally:
            self.model.train(was_training)
        if features.ndim != 2 or features.shape[-1] != self.num_features:
            raise ConfigError(f"backbone {self.name} outputs features of shape {tuple(features.shape[1:])} but "
                              f"declares num_features={self.num_features}; the head is built from num_features")


def network_error_types() -> tuple[type[BaseException], ...]:
    """Exceptions that mean 'could not reach the hub', whichever library raised them."""
    import urllib.error

    types: list[type[BaseException]] = [urllib.error.URLError, ConnectionError, TimeoutError, OSError]
    try:
        import requests

        types.append(requests.exceptions.RequestException)
    except ImportError:  # requests is optional
        pass
    return tuple(types)
