"""finetune: fine-tune pretrained vision backbones with one switch for how the backbone is frozen."""

from finetune.errors import ConfigError

__all__ = ["ConfigError"]
