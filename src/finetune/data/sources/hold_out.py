"""The stratified, seeded hold-out every datamodule splits with (digits, image folders, torchvision datasets), and the
checks that make a bad fraction or a too-small class one line naming what to change instead of scikit-learn's
errors."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from sklearn.model_selection import train_test_split

from finetune.errors import ConfigError


def check_fractions(val_fraction: float, test_fraction: float | None = None, test_may_be_zero: bool = False) -> None:
    """val in (0, 1); test in (0, 1) (or [0, 1) where 0 means "test on val"); together below 1."""
    if not 0 < float(val_fraction) < 1:
        raise ConfigError(f"data.val_fraction={val_fraction} must be between 0 and 1 (e.g. 0.1)")
    if test_fraction is None:
        return
    low_ok = float(test_fraction) >= 0 if test_may_be_zero else float(test_fraction) > 0
    if not (low_ok and float(test_fraction) < 1):
        allowed = "0 (test on val) or between 0 and 1" if test_may_be_zero else "between 0 and 1"
        raise ConfigError(f"data.test_fraction={test_fraction} must be {allowed} (e.g. 0.1)")
    if float(val_fraction) + float(test_fraction) >= 1:
        raise ConfigError(f"data.val_fraction={val_fraction} and data.test_fraction={test_fraction} leave nothing to "
                          f"train on: their sum must be below 1")


def hold_out(labels: Sequence[int] | np.ndarray, fraction: float, seed: int, key: str,
             class_names: Sequence[str] | None = None, source: str = "the data",
             of_whole: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """(rest, held out): indices into `labels`, a stratified share `fraction` held out with `seed` (scikit-learn's
    train_test_split). `fraction` 0 holds out nothing. `key` names the setting in errors, whose value is
    `fraction * of_whole` (val is set as a share of everything but taken from what the test split left)."""
    labels = np.asarray(labels)
    index = np.arange(len(labels))
    if fraction == 0:
        return index, index[:0]
    classes, counts = np.unique(labels, return_counts=True)
    name = (lambda c: repr(class_names[c])) if class_names is not None else (lambda c: str(c))
    lonely = [name(int(c)) for c, n in zip(classes, counts) if n < 2]
    if lonely:
        raise ConfigError(f"class {', '.join(lonely[:5])} of {source} has a single sample: {key} holds out a "
                          f"stratified share of every class, which needs at least 2 per class; add samples to it or "
                          f"remove it")
    held = math.ceil(fraction * len(labels))
    if held < len(classes) or len(labels) - held < len(classes):
        raise ConfigError(f"{key}={fraction * of_whole:g} holds out {held} of the {len(labels)} samples of {source}, "
                          f"and {len(labels) - held} stay: each side needs at least one per class ({len(classes)}); "
                          f"choose {key} between {len(classes) / len(labels) * of_whole:.3g} and "
                          f"{(1 - len(classes) / len(labels)) * of_whole:.3g}, or add samples")
    rest, held_out = train_test_split(index, test_size=fraction, stratify=labels, random_state=seed)
    return rest, held_out
