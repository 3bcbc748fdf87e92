"""finetune: fine-tune pretrained vision backbones with one switch for how the backbone is frozen."""

from finetune.errors import ConfigError

__all__ = ["ConfigError", "load_model"]


def __getattr__(name: str):
    # torch and Lightning load on first use, so `import finetune` stays light
    if name == "load_model":
        from finetune.classifier import load_model

        return load_model
    raise AttributeError(f"module 'finetune' has no attribute {name!r}")
