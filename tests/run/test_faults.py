"""Bad configuration, bad data, offline downloads and numerical faults: one clear line, nothing lost."""

from __future__ import annotations

import os

import pytest
import torch
from PIL import Image

from finetune.backbones import timm as timm_backbones
from finetune.data import ImageFolderDataModule, TorchvisionDataModule
from finetune.data.sources.image_folder import CorruptImageError
from finetune.errors import ConfigError, OfflineError
from finetune.build import build
from tests.conftest import TINY, compose_config
from tests.test_cli import run_main

NO_DATA = [o for o in TINY if not o.startswith("data")]


# -- configuration -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("group,bad", [("backbone", "efficientnet_b9"), ("data", "imagenet"), ("head", "mlp3"),
                                       ("optimizer", "lamb"), ("trainer", "tpu")])
def test_unknown_group_option_lists_the_valid_choices(tmp_path, group, bad):
    from hydra.errors import MissingConfigException

    with pytest.raises(MissingConfigException, match=rf"Could not find '{group}/{bad}'") as raised:
        compose_config(tmp_path, [f"{group}={bad}"])
    assert "Available options" in str(raised.value)


@pytest.mark.parametrize("override,message", [
    ("optimizer.lr=0", r"optimizer.lr=0 must be a positive number"),
    ("optimizer.lr=-1e-3", r"optimizer.lr=-0.001 must be a positive number"),
    ("data.batch_size=0", r"data.batch_size=0 must be a positive integer"),
    ("data.image_size=-8", r"data.image_size=-8 must be a positive integer"),
    ("data.interpolation=lanczos", r"data.interpolation='lanczos'; choose one of: bilinear, bicubic, nearest"),
    ("strategy.feature_dtype=int8", r"strategy.feature_dtype='int8'; choose one of: float32, float16, bfloat16"),
])
def test_invalid_values_fail_before_any_heavy_work(tiny, override, message):
    strategy = ["strategy=cached"] if override.startswith("strategy.") else []
    with pytest.raises(ConfigError, match=message):
        build(tiny(*strategy, override))


def test_an_image_size_the_backbone_cannot_take_names_it_and_the_native_size(tiny):
    with pytest.raises(ConfigError, match=r"data.image_size=32 does not fit backbone vit_tiny_patch16_224 .*native size is 224"):
        build(tiny("backbone.name=vit_tiny_patch16_224"))


def test_a_backbone_whose_width_does_not_match_its_declaration_is_caught():
    backbone = timm_backbones.build("test_resnet", pretrained=False)
    backbone.num_features += 1
    with pytest.raises(ConfigError, match=r"declares num_features=.*the head is built from num_features"):
        backbone.check_input_size(32)


def test_bad_values_on_the_command_line_are_one_line_with_exit_code_2(tmp_path):
    result = run_main("finetune.train", *TINY, "optimizer.lr=0", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == "error: optimizer.lr=0 must be a positive number"
    assert "Traceback" not in result.stderr


# -- data --------------------------------------------------------------------------------------------------------
def make_folder(root, classes=("cat", "dog"), per_class=6, split_dirs=("train", "val")):  # noqa: D103
    for split in split_dirs:
        for name in classes:
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                Image.new("RGB", (20, 20), (40 * i, 100, 200 if name == "dog" else 0)).save(folder / f"{i}.png")
    return root


def test_missing_data_root_names_the_path(tmp_path):
    with pytest.raises(ConfigError, match=rf"data.root={tmp_path / 'nope'} does not exist"):
        ImageFolderDataModule(root=str(tmp_path / "nope"))


def test_class_folder_without_images_names_the_folder(tmp_path):
    root = make_folder(tmp_path / "images")
    for image in (root / "val" / "dog").iterdir():
        image.unlink()
    with pytest.raises(ConfigError, match=rf"class folder {root / 'val' / 'dog'} has no images"):
        ImageFolderDataModule(root=str(root)).num_classes


def test_empty_split_names_the_folder(tmp_path):
    root = make_folder(tmp_path / "images", split_dirs=("train",))
    (root / "val").mkdir()
    with pytest.raises(ConfigError, match=rf"data folder {root / 'val'} has no class folders"):
        ImageFolderDataModule(root=str(root)).num_classes


def test_image_folder_serves_uint8_batches_and_refuses_augmentation_asked_for_with_cached(tmp_path):
    root = make_folder(tmp_path / "images")
    datamodule = ImageFolderDataModule(root=str(root), image_size=16, batch_size=4, num_workers=0)
    images, labels = next(iter(datamodule.train_dataloader()))
    assert images.dtype == torch.uint8 and images.shape == (4, 3, 16, 16) and datamodule.num_classes == 2
    assert datamodule.augment == "random_resized_crop", "the default for strategies that run the backbone"
    with pytest.raises(ConfigError, match=r"strategy=cached stores each image's features once, so "
                                          r"data.augment=flip would be frozen .*drop the override"):
        build(compose_config(tmp_path, [*NO_DATA, "strategy=cached", "data=image_folder", f"data.root={root}",
                                        "data.image_size=16", "data.augment=flip"]))


def test_corrupt_image_is_named_by_verify_before_training(tmp_path):
    root = make_folder(tmp_path / "images")
    (root / "train" / "cat" / "3.png").write_bytes(b"not a png")
    datamodule = ImageFolderDataModule(root=str(root), verify_images=True)
    with pytest.raises(CorruptImageError, match=r"1 unreadable image\(s\) .*first: cannot read image .*3.png"):
        datamodule.num_classes


def test_corrupt_image_met_in_a_worker_fails_the_run_naming_the_file(tmp_path):
    root = make_folder(tmp_path / "images")
    (root / "train" / "dog" / "2.png").write_bytes(b"\x89PNG truncated")
    result = run_main("finetune.train", *NO_DATA, "data=image_folder", f"data.root={root}", "data.num_workers=1",
                      "data.image_size=16", "data.batch_size=4", "data.augment=none", "strategy=freeze",
                      f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: cannot read image ") and last.endswith(": cannot identify image file "
                                                                           f"'{root / 'train' / 'dog' / '2.png'}'")


def test_dataset_download_offline_is_one_line_with_the_local_option(tmp_path, monkeypatch):
    import urllib.error

    import torchvision.datasets.utils as tv_utils

    def unreachable(*args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(tv_utils, "_urlretrieve", unreachable)
    with pytest.raises(OfflineError, match=r"could not download CIFAR10 into .*offline\? .*data=image_folder"):
        TorchvisionDataModule(name="CIFAR10", root=str(tmp_path)).num_classes
    with pytest.raises(OfflineError, match=r"CIFAR10 is not under .* download is off"):
        TorchvisionDataModule(name="CIFAR10", root=str(tmp_path), download=False).num_classes


def test_unknown_torchvision_dataset_lists_choices():
    with pytest.raises(ConfigError, match=r"data.name='CIFAR11' is not a torchvision dataset; choose one of: .*CIFAR10"):
        TorchvisionDataModule(name="CIFAR11")


# -- numerical faults --------------------------------------------------------------------------------------------
def test_nan_loss_stops_the_run_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    result = run_main("finetune.train", *TINY, "strategy=freeze", "trainer.max_epochs=3",
                      "callbacks.last_checkpoint.every_n_train_steps=2",
                      "+callbacks.poison._target_=tests.run.faults.PoisonWeightsAtStep", "+callbacks.poison.step=5",
                      f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: training loss became nan at step 6 (epoch 1); last good checkpoint: ")
    assert "optimizer.lr" in last
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == 4
    assert all(torch.isfinite(t).all() for t in checkpoint["state_dict"].values() if t.is_floating_point())
    assert not (run_dir / "metrics.json").exists()


# -- sweeps --------------------------------------------------------------------------------------------------------
def test_a_failed_job_does_not_end_the_sweep(tmp_path):
    """A bad value and a diverging run each fail their own job; the sweep goes on, then exits 1 naming them."""
    from finetune.compare.report import collect_runs, format_text, summarise

    sweep = tmp_path / "sweep"
    result = run_main("finetune.train", "-m", *TINY, "strategy=freeze", "optimizer.lr=-1,1e-2",
                      "+callbacks.poison._target_=tests.run.faults.PoisonWeightsAtStep", "+callbacks.poison.step=2,1000",
                      f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert result.returncode == 1, result.stderr[-3000:]
    jobs = {p.name: p for p in sweep.iterdir() if p.is_dir()}
    assert sorted(jobs) == ["0", "1", "2", "3"], "every job ran"
    failed = {name for name, job in jobs.items() if (job / "failure.json").exists()}
    assert failed == {"0", "1", "2"} and (jobs["3"] / "metrics.json").exists()
    assert "3 of 4 jobs failed" in result.stderr
    assert "optimizer.lr=-1 must be a positive number" in result.stderr
    assert "training loss became nan" in result.stderr
    rows = collect_runs(sweep)
    assert [r.get("failed", False) for r in rows] == [False, True, True, True]
    text = format_text(summarise(rows))
    assert text.count("failed: freeze: ") == 3 and "training loss became nan" in text


# -- precision ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("native,expected", [(True, "bf16-mixed"), (False, "16-mixed")])
def test_auto_precision_uses_bf16_only_where_the_gpu_has_it(monkeypatch, native, expected):
    from finetune import config

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: native)
    assert config.auto_precision("auto") == expected and config.auto_precision("cpu") == "32-true"


# -- test split ----------------------------------------------------------------------------------------------------
def test_image_folder_without_test_holds_out_part_of_train_never_val(tmp_path):
    root = make_folder(tmp_path / "images", per_class=10)
    datamodule = ImageFolderDataModule(root=str(root), test_fraction=0.2)
    splits = datamodule.samples
    assert len(splits["test"]) == 4 and len(splits["train"]) == 16 and len(splits["val"]) == 20
    assert not {p for p, _ in splits["test"]} & ({p for p, _ in splits["train"]} | {p for p, _ in splits["val"]})
    assert {label for _, label in splits["test"]} == {0, 1}, "stratified"
    assert "held out 20% of" in datamodule.test_split
    again = ImageFolderDataModule(root=str(root), test_fraction=0.2).samples["test"]
    assert again == splits["test"], "seeded"


def test_image_folder_test_on_val_only_when_asked_and_it_says_so(tmp_path, caplog):
    root = make_folder(tmp_path / "images")
    datamodule = ImageFolderDataModule(root=str(root), test_fraction=0)
    assert datamodule.samples["test"] == datamodule.samples["val"]
    assert "NOT held out" in datamodule.test_split and "testing on val" in caplog.text


def test_a_flat_folder_with_test_fraction_0_tests_on_val_as_documented(tmp_path, caplog):
    """root/<class>/* with data.test_fraction=0 raised scikit-learn's InvalidParameterError."""
    from tests.conftest import make_image_folder

    root = make_image_folder(tmp_path / "flat", per_class=10, split_dirs=("",))
    datamodule = ImageFolderDataModule(root=str(root), test_fraction=0, val_fraction=0.2)
    assert datamodule.samples["test"] == datamodule.samples["val"] and len(datamodule.samples["val"]) == 4
    assert "NOT held out" in datamodule.test_split and "testing on val" in caplog.text


@pytest.mark.parametrize("change,expected", [
    (["data.test_fraction=0"], None),
    (["data.val_fraction=0"], "data.val_fraction=0 must be between 0 and 1"),
    (["data.test_fraction=1.5"], "data.test_fraction=1.5 must be 0 (test on val) or between 0 and 1"),
    (["data.val_fraction=0.6", "data.test_fraction=0.5"], "leave nothing to train on"),
    (["data.val_fraction=0.05"], "data.val_fraction=0.05 holds out 1 of the 18 samples"),
    (["+lonely=1"], "class 'lonely' of"),
])
def test_image_folder_split_mistakes_are_one_line_with_exit_2(tmp_path, change, expected):
    """A class with one image, or fractions that leave a split without a class, raised raw ValueErrors; fractions
    were never checked. The flat layout splits 20 images of 2 classes (18 stay after the test share)."""
    from tests.conftest import make_image_folder

    root = make_image_folder(tmp_path / "flat", per_class=10, split_dirs=("",))
    if "+lonely=1" in change:
        make_image_folder(tmp_path / "flat", classes=("lonely",), per_class=1, split_dirs=("",))
        change = []
    overrides = [o for o in TINY if not o.startswith("data")]
    result = run_main("finetune.train", *overrides, "data=image_folder", f"data.root={root}", "data.image_size=32",
                      "data.num_workers=0", "strategy=cached", "trainer.max_epochs=1", *change,
                      f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    if expected is None:
        assert result.returncode == 0, result.stderr[-2000:]
        return
    assert result.returncode == 2 and expected in result.stderr, result.stderr[-2000:]
    assert len(result.stderr.strip().splitlines()) == 1


def test_every_datamodule_splits_with_the_one_hold_out():
    """digits, image folders and torchvision datasets hold out through finetune.data.sources.hold_out (one implementation,
    one set of checks); the digits split is the one it always was (stratified, seeded)."""
    import inspect

    from finetune.data import DigitsDataModule
    from finetune.data.sources import image_folder, torchvision as tv_data

    for module in (image_folder, tv_data, DigitsDataModule):
        source = inspect.getsource(module if inspect.ismodule(module) else inspect.getmodule(module))
        assert "hold_out(" in source and "train_test_split" not in source
    digits = DigitsDataModule(image_size=8)
    sizes = {split: len(labels) for split, (_, labels) in digits.load_splits().items()}
    assert sizes == {"train": 1257, "val": 270, "test": 270}


# -- Trainer flags that limit batches ------------------------------------------------------------------------------
@pytest.mark.parametrize("strategy", ["freeze", "cached"])
@pytest.mark.parametrize("flag,check", [
    ("overfit_batches=2", lambda t: t.num_training_batches == 2 and t.num_val_batches == [2]),
    ("limit_train_batches=2", lambda t: t.num_training_batches == 2 and t.global_step == 4),
    ("limit_val_batches=0.5", lambda t: t.num_val_batches == [2]),
    ("limit_test_batches=1", lambda t: t.num_test_batches == [1]),
    ("val_check_interval=2", lambda t: t.val_check_batch == 2),
    ("num_sanity_val_steps=2", lambda t: t.num_sanity_val_steps == 2),
    ("accumulate_grad_batches=2", lambda t: t.global_step == t.max_epochs * t.num_training_batches // 2),
])
def test_batch_limiting_trainer_flags_work_with_in_memory_loaders(tiny, strategy, flag, check):
    from tests.conftest import fit

    small_eval = ["strategy.batch_size=4"] if strategy == "cached" else []  # cached evaluates in head batches
    trainer, _, _ = fit(tiny(f"strategy={strategy}", f"++trainer.{flag}", "data.eval_batch_size=4", *small_eval),
                        test=True)
    assert check(trainer), flag
    assert "test/acc" in trainer.callback_metrics


def test_seed_null_draws_a_seed_logs_it_and_metrics_json_records_it(tmp_path, caplog):
    """seed=null crashed with a raw TypeError at int(seed) in the datamodule: a seed is drawn, logged and
    recorded, and passing it again repeats the run."""
    import json

    from finetune.train import DRAWN_SEED_ENV, train

    caplog.set_level("INFO")
    first = train(compose_config(tmp_path / "a", [*TINY, "seed=null", "strategy=freeze", "trainer.max_epochs=1"]))
    seed = first["seed"]
    assert isinstance(seed, int) and f"seed=null: drew seed={seed}" in caplog.text
    assert json.loads((tmp_path / "a" / "metrics.json").read_text())["seed"] == seed
    assert DRAWN_SEED_ENV not in os.environ, "the next job of a sweep draws its own"
    again = train(compose_config(tmp_path / "b", [*TINY, f"seed={seed}", "strategy=freeze", "trainer.max_epochs=1"]))
    assert (again["test_acc"], again["test_loss"]) == (first["test_acc"], first["test_loss"])


@pytest.mark.parametrize("world", [1, 4])
def test_one_drop_last_rule_for_in_memory_data_image_files_and_the_store(tmp_path, world):
    """Drop-last was decided per dataset for image files but per rank for in-memory data, so few images on many
    GPUs could give the image loader no batch. Now every train loader batches through IndexBatchSampler:
    a rank's last partial batch is dropped only when the rank has more than one batch."""
    from types import SimpleNamespace

    from finetune.data import FakeDataModule
    from tests.conftest import make_image_folder

    root = make_image_folder(tmp_path / "images", per_class=3, split_dirs=("train", "val", "test"))  # 6 to train
    common = {"batch_size": 4, "image_size": 16, "num_workers": 0}
    modules = {"memory": FakeDataModule(num_samples=6, native_size=8, **common),
               "files": ImageFolderDataModule(root=str(root), **common),
               "store": ImageFolderDataModule(root=str(root), store=True, store_dir=str(tmp_path / "store"), **common)}
    expected = {1: 1, 4: 1}[world]  # 6 samples: one batch of 4 (the rest dropped); on 4 ranks 2 each, kept
    # the store built beforehand by one process: these pretend ranks have no process group to build it together
    modules["store"].trainer = SimpleNamespace(world_size=1, global_rank=0, overfit_batches=0)
    modules["store"].prepare_data()
    for name, datamodule in modules.items():
        for rank in range(world):
            datamodule.trainer = SimpleNamespace(world_size=world, global_rank=rank, overfit_batches=0)
            assert len(datamodule.train_dataloader()) == expected, (name, rank)


def test_an_epoch_without_a_batch_is_refused_in_one_line():
    """overfit_batches reads the split in order without padding: 3 samples on 4 ranks leave rank 3 nothing."""
    from types import SimpleNamespace

    from finetune.data import FakeDataModule

    datamodule = FakeDataModule(num_samples=3, native_size=8, batch_size=4, image_size=16)
    datamodule.trainer = SimpleNamespace(world_size=4, global_rank=3, overfit_batches=1)
    with pytest.raises(ConfigError, match=r"the train split \(3 samples\) gives rank 3 of 4 no batch"):
        datamodule.train_dataloader()
