"""What every backbone builder returns: a feature extractor plus the metadata the rest of the template reads."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn


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
