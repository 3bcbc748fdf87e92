"""Every option of every config group is composed, instantiated and trains at least one optimizer step.

Composing alone proves only the YAML (it let `debug=overfit` through while it crashed); here each option builds its
datamodule, backbone, strategy, callbacks and loggers and runs a real Trainer.fit on tiny settings.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from finetune.config import CONFIG_DIR
from tests.conftest import TINY, compose_config, fit, make_image_folder, write_mnist

OPTIONS = sorted(f"{p.parent.name}={p.stem}" for p in Path(CONFIG_DIR).glob("*/*.yaml") if p.parent.name != "hydra")
SMALL = ["++trainer.max_steps=2", "++trainer.limit_val_batches=1", "++trainer.limit_test_batches=1"]
# options that need more than the tiny defaults, or that train elsewhere
EXTRA = {
    "backbone=efficientnet_lite0": [],
    "backbone=timm": ["backbone.name=test_resnet", "backbone.pretrained=false"],
    "backbone=torchvision": ["backbone.name=resnet18", "backbone.pretrained=false"],
    "callbacks=default": ["trainer.enable_progress_bar=true"],  # it holds the RichProgressBar
    "data=digits": ["data.image_size=32"],
    "data=image_folder": ["data.num_workers=0", "data.image_size=32", "data.batch_size=4"],
    "data=torchvision": ["data.name=MNIST", "data.download=false", "data.num_workers=0", "data.image_size=32"],
    # staged strategies: enough epochs for their phases (phases longer than the run are refused)
    "strategy=gradual": ["trainer.max_epochs=4"],
    "strategy=gradual_backbone_finetuning": ["trainer.max_epochs=6"],
    "strategy=lp_ft": ["trainer.max_epochs=11"],
    "experiment=slurm_multinode": ["trainer.accelerator=cpu", "trainer.devices=1", "trainer.num_nodes=1",
                                   "trainer.strategy=auto"],
}
NEEDS_CUDA = {"trainer=gpu", "trainer=ddp"}
TRAINED_ELSEWHERE = {"trainer=ddp_cpu": "tests/run/test_ddp.py (two gloo processes need the command line)",
                     **{f"logger={name}": "tests/test_loggers.py (one run logged to all, read back from each store)"
                        for name in ("mlflow", "wandb", "many_loggers")}}


def test_every_option_is_listed_once():
    assert len(OPTIONS) == len(set(OPTIONS)) >= 30
    assert set(EXTRA) | NEEDS_CUDA | set(TRAINED_ELSEWHERE) <= set(OPTIONS), "a stale entry in this test"


@pytest.mark.parametrize("option", OPTIONS)
def test_option_instantiates_and_trains_a_step(tmp_path, option):
    if option in TRAINED_ELSEWHERE:
        pytest.skip(f"trained in {TRAINED_ELSEWHERE[option]}")
    if option in NEEDS_CUDA and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    group = option.split("=")[0]
    base = [o for o in TINY if not o.lstrip("~+").startswith((f"{group}=", f"{group}."))]
    if group == "backbone":  # the tiny backbone's own settings go with it
        base = [o for o in base if not o.startswith("backbone")]
    extra = list(EXTRA.get(option, []))
    if option == "data=image_folder":
        extra.append(f"data.root={make_image_folder(tmp_path / 'images')}")
    if option == "data=torchvision":
        extra.append(f"data.root={write_mnist(tmp_path / 'mnist')}")
    if group == "data":
        base = [o for o in base if not o.startswith("data")]
    cfg = compose_config(tmp_path, [*base, option, *extra, *SMALL])
    OmegaConf.to_container(cfg, resolve=True)
    trainer, module, _ = fit(cfg, test=True)
    assert trainer.global_step >= 1, f"{option} took no optimizer step"
    assert "test/acc" in trainer.callback_metrics


# option values beyond each config file's defaults: the feature cache's layout and reduced-precision entries
VALUES = {
    "cached shards of 16 rows": ["strategy=cached", "strategy.shard_rows=16"],
    "cached float16": ["strategy=cached", "strategy.feature_dtype=float16"],
    "cached bfloat16": ["strategy=cached", "strategy.feature_dtype=bfloat16"],
    "lp_ft probe on shards of 16 rows": ["strategy=lp_ft", "strategy.shard_rows=16", "trainer.max_epochs=11"],
    # image files decoded once into the store, augmented on the device (random_resized_crop, flip), and read by cached
    "image_folder store, device random_resized_crop": ["data=image_folder", "data.store=true", "strategy=freeze"],
    "image_folder store, device flip": ["data=image_folder", "data.store=true", "data.augment=flip", "strategy=full"],
    "image_folder store, decoded by torchvision": ["data=image_folder", "data.store=true",
                                                   "data.store_decode=torchvision", "strategy=freeze"],
    "image_folder store, larger stored size, cached": ["data=image_folder", "data.store=true", "data.store_size=48",
                                                       "strategy=cached"],
    "torchvision store": ["data=torchvision", "data.name=MNIST", "data.download=false", "data.store=true",
                          "strategy=freeze"],
}


@pytest.mark.parametrize("name", VALUES)
def test_option_value_trains_a_step(tmp_path, name):
    overrides = list(VALUES[name])
    base = TINY
    if "data=image_folder" in overrides or "data=torchvision" in overrides:
        base = [o for o in TINY if not o.startswith("data")]
        overrides += ["data.num_workers=0", "data.image_size=32", "data.batch_size=4"]
        overrides.append(f"data.root={make_image_folder(tmp_path / 'images')}" if "data=image_folder" in overrides
                         else f"data.root={write_mnist(tmp_path / 'mnist')}")
    trainer, _, _ = fit(compose_config(tmp_path, [*base, *overrides, *SMALL]), test=True)
    assert trainer.global_step >= 1 and "test/acc" in trainer.callback_metrics


def search_space_corner(cfg, high: bool) -> list[str]:
    """Each search_space key at one end of its range (a choice's first or last option)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    overrides = []
    for key, value in cfg.search_space.items():
        if value is None:
            continue
        parsed = OverridesParser.create().parse_overrides([f"{key}={value}"])[0]
        if parsed.is_interval_sweep():
            end = parsed.value().end if high else parsed.value().start
        else:
            options = list(parsed.sweep_iterator())
            end = options[-1] if high else options[0]
        overrides.append(f"{key}={end}")
    return overrides


# the strategies whose search_space reaches beyond optimizer.lr and weight_decay (their own knobs)
OWN_KNOBS = {"lora": [], "lp_ft": ["trainer.max_epochs=11"], "gradual": ["trainer.max_epochs=4"],
             "gradual_fastai": ["trainer.max_epochs=2"]}


@pytest.mark.parametrize("high", [False, True], ids=["low", "high"])
@pytest.mark.parametrize("strategy", OWN_KNOBS)
def test_a_strategy_trains_a_step_at_each_end_of_its_search_space(tmp_path, strategy, high):
    """What finetune-compare's tuning may set (compare.tune): every key of the strategy's search_space, at the ends
    of its range, composes, builds and trains."""
    overrides = [*TINY, f"strategy={strategy}", *OWN_KNOBS[strategy]]
    corner = search_space_corner(compose_config(tmp_path, overrides), high)
    assert any(not key.startswith("optimizer.") for key in (o.split("=")[0] for o in corner))
    trainer, _, _ = fit(compose_config(tmp_path, [*overrides, *corner, *SMALL]))
    assert trainer.global_step >= 1


def test_test_false_fits_and_leaves_the_test_split_unread(tmp_path):
    """test=false (finetune-compare's tuning trials): no test evaluation, no predictions.csv, metrics.json says so;
    a search that optimises a test metric is refused in one line."""
    import json

    from finetune.errors import ConfigError
    from finetune.train import objective, train

    cfg = compose_config(tmp_path, [*TINY, "strategy=freeze", "test=false", "trainer.max_epochs=1"])
    metrics = train(cfg)
    assert metrics["tested"] is False and metrics["best_val_acc"] is not None
    assert not (tmp_path / "predictions.csv").exists()
    assert json.loads((tmp_path / "metrics.json").read_text())["tested"] is False
    cfg.optimized_metric = "test/acc"
    with pytest.raises(ConfigError, match="optimized_metric=test/acc needs the test split, which test=false"):
        objective(cfg)
