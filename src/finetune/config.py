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


def user_error(err: BaseException) -> ConfigError | None:
    """The ConfigError behind `err` (Hydra's instantiate and Lightning wrap or chain them), if there is one."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, ConfigError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def instantiate(node, **kwargs):
    """hydra.utils.instantiate, re-raising a user's ConfigError as itself rather than wrapped."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate as hydra_instantiate

    try:
        return hydra_instantiate(node, **kwargs)
    except InstantiationException as err:
        cause = user_error(err)
        if cause is None:
            raise
        raise cause from None


def one_line(err: ConfigError) -> str:
    """The message, also when a DataLoader worker re-raised it inside a traceback ('pkg.Class: message')."""
    line = str(err).strip().splitlines()[-1]
    prefix = f"{type(err).__module__}.{type(err).__name__}: "
    return line[len(prefix):] if line.startswith(prefix) else line


def report_user_errors(task):
    """Turn a ConfigError raised anywhere in the job into one line on stderr and exit code 2."""

    @functools.wraps(task)
    def wrapper(*args, **kwargs):
        try:
            return task(*args, **kwargs)
        except Exception as err:
            cause = user_error(err)
            if cause is None:
                raise
            message = one_line(cause)
            log.error(message)
            print(f"error: {message}", file=sys.stderr)
            sys.exit(2)

    return wrapper


register_resolvers()
# Frozen parts sit in eval mode on purpose; Lightning's warning about it would only alarm users.
warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")
