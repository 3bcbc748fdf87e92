"""Classification heads. Built by the module once the backbone's width and the data's class count are known."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from finetune.errors import ConfigError


class LinearHead(nn.Sequential):
    """Dropout (optional) then one Linear layer: the linear probe."""

    def __init__(self, in_features: int, num_classes: int, dropout: float = 0.0):
        _check_sizes(in_features, num_classes)
        super().__init__(nn.Dropout(dropout) if dropout else nn.Identity(), nn.Linear(in_features, num_classes))


class MLPHead(nn.Sequential):
    """Linear -> GELU -> Dropout for each hidden size, then the classifier Linear."""

    def __init__(self, in_features: int, num_classes: int, hidden_sizes: Sequence[int] = (512,), dropout: float = 0.1):
        _check_sizes(in_features, num_classes)
        if any(int(h) <= 0 for h in hidden_sizes):
            raise ConfigError(f"head.hidden_sizes={list(hidden_sizes)} must all be positive integers")
        layers: list[nn.Module] = []
        width = in_features
        for hidden in hidden_sizes:
            layers += [nn.Linear(width, int(hidden)), nn.GELU(), nn.Dropout(dropout)]
            width = int(hidden)
        layers.append(nn.Linear(width, num_classes))
        super().__init__(*layers)


def _check_sizes(in_features: int, num_classes: int) -> None:
    if in_features <= 0:
        raise ConfigError(f"head in_features={in_features} must be positive (it comes from the backbone)")
    if num_classes < 2:
        raise ConfigError(f"head num_classes={num_classes} must be at least 2 (it comes from the data)")
