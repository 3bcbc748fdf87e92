"""finetune: fine-tune pretrained vision backbones with one switch for how the backbone is frozen."""

import importlib.metadata

from finetune.errors import ConfigError

__all__ = ["ConfigError", "load_model", "package_version"]


def package_version() -> str:
    """The installed distribution's version; "source" when the package runs from a checkout that was never
    installed (PYTHONPATH=src, as on a machine without pip access). Cache keys digest the source code as well."""
    try:
        return importlib.metadata.version("finetune")
    except importlib.metadata.PackageNotFoundError:
        return "source"


def __getattr__(name: str):
    # torch and Lightning load on first use, so `import finetune` stays light
    if name == "load_model":
        from finetune.classifier import load_model

        return load_model
    raise AttributeError(f"module 'finetune' has no attribute {name!r}")
