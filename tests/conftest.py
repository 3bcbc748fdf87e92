"""Shared helpers: compose the real configs with overrides, and fit them on a tiny timm model."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate

from finetune.config import CONFIG_DIR
from finetune.build import build, instantiate_all
from finetune.train import finish_tracker_runs

TESTS_DIR = Path(__file__).resolve().parent
# A tiny timm model (99k parameters, BatchNorm, 5 blocks) at 32 px on 64 fake images keeps each fit under a second.
TINY = ["backbone=timm", "backbone.name=test_efficientnet", "backbone.pretrained=false", "data=fake",
        "data.num_samples=64", "data.image_size=32", "data.native_size=16", "data.batch_size=16",
        "trainer.accelerator=cpu", "trainer.max_epochs=2", "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false", "~callbacks.progress_bar", "logger=csv"]


def compose_config(tmp_path: Path, overrides: list[str], config_name: str = "train", return_hydra: bool = False):
    """The composed config exactly as the CLI would build it, with outputs and cache under tmp_path (and with its
    `hydra` node: launcher, sweep, if return_hydra)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name=config_name, return_hydra_config=return_hydra, overrides=[
            f"paths.output_dir={tmp_path}", f"paths.cache_dir={tmp_path / 'cache'}", f"paths.log_dir={tmp_path}",
            *overrides])


def initial_state(cfg) -> dict[str, torch.Tensor]:
    """Every parameter and buffer exactly as `fit(cfg)` will start from (same seed, same construction order)."""
    L.seed_everything(cfg.seed, workers=True)
    _, module = build(cfg)
    return snapshot(module)


def snapshot(module) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in [*module.named_parameters(), *module.named_buffers()]}


def fit(cfg, *, test: bool = False, callbacks: tuple = ()):
    """Fit a composed config in-process (with `callbacks` added to the config's); returns (trainer, module,
    datamodule)."""
    L.seed_everything(cfg.seed, workers=True)
    datamodule, module = build(cfg)
    trainer = instantiate(cfg.trainer, callbacks=[*instantiate_all(cfg.get("callbacks")), *callbacks],
                          logger=instantiate_all(cfg.get("logger"), "logger") or False)
    trainer.fit(module, datamodule=datamodule)
    if test:
        trainer.test(module, datamodule=datamodule, verbose=False)
    # as train() does: an open W&B run would take the next test's WandbLogger (wandb.init returns the open run)
    finish_tracker_runs(trainer.loggers)
    return trainer, module, datamodule


@pytest.fixture
def tiny(tmp_path):
    """compose(overrides) for the tiny model on fake data."""
    return lambda *overrides: compose_config(tmp_path, [*TINY, *overrides])


@pytest.fixture(autouse=True)
def _cpu_threads():
    torch.set_num_threads(2)
    yield


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def make_image_folder(root: Path, classes=("cat", "dog"), per_class: int = 6, split_dirs=("train", "val")) -> Path:
    """root/<split>/<class>/<i>.png: small coloured squares a tiny model can tell apart."""
    from PIL import Image

    for split in split_dirs:
        for label, name in enumerate(classes):
            folder = root / split / name if split else root / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                Image.new("RGB", (20, 20), (40 * i, 100, 200 * label)).save(folder / f"{i}.png")
    return root


def write_mnist(root: Path, num_train: int = 200, num_test: int = 20) -> Path:
    """MNIST's raw idx files under root/MNIST/raw, so torchvision.datasets.MNIST loads offline with download=False."""
    import numpy as np

    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    generator = np.random.default_rng(0)
    for prefix, count in (("train", num_train), ("t10k", num_test)):
        images = generator.integers(0, 256, (count, 28, 28), dtype=np.uint8)
        labels = np.arange(count, dtype=np.uint8) % 10
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(
            np.array([2051, count, 28, 28], dtype=">i4").tobytes() + images.tobytes())
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(np.array([2049, count], dtype=">i4").tobytes()
                                                          + labels.tobytes())
    return root
