"""Where the Hydra configs live, the resolvers they use, and how entry points report a user's mistake."""

from __future__ import annotations

import functools
import logging
import os
import sys
import warnings
from pathlib import Path

import torch
from omegaconf import OmegaConf

from finetune.errors import ConfigError

log = logging.getLogger("finetune")

# configs/ sits at the repository root beside src/ (installed with `pip install -e .`); FINETUNE_CONFIG_DIR moves it.
CONFIG_DIR = str(Path(os.environ.get("FINETUNE_CONFIG_DIR", Path(__file__).resolve().parents[2] / "configs")))


def auto_precision(accelerator: str = "auto") -> str:
    """bf16-mixed where a CUDA GPU will run the job, 32-true on the CPU."""
    on_gpu = accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    return "bf16-mixed" if on_gpu else "32-true"


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("auto_precision"):
        OmegaConf.register_new_resolver("auto_precision", auto_precision)


def report_user_errors(task):
    """Turn a ConfigError raised anywhere in the job into one line on stderr and exit code 2."""

    @functools.wraps(task)
    def wrapper(*args, **kwargs):
        try:
            return task(*args, **kwargs)
        except ConfigError as err:
            message = str(err).strip().splitlines()[-1]
            log.error(message)
            print(f"error: {message}", file=sys.stderr)
            sys.exit(2)

    return wrapper


register_resolvers()
# Frozen parts sit in eval mode on purpose; Lightning's warning about it would only alarm users.
warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")
