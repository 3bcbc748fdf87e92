"""Using a trained model: load_model on raw images gives the probabilities the module gives on the test split's
inputs, class names come from the checkpoint, and finetune-predict writes predictions.csv and lists what it could
not read."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from finetune import load_model
from finetune.classifier import load_module
from tests.conftest import TINY, compose_config, fit, make_image_folder, write_mnist
from tests.test_cli import run_main

# the tiny model and trainer of TINY, on data each test chooses
TINY_MODEL = [o for o in TINY if not o.startswith("data")]
FOLDER = ["data=image_folder", "data.num_workers=0", "data.image_size=32", "data.batch_size=8",
          "data.eval_batch_size=8", "data.augment=none"]


def train_tiny(tmp_path: Path, *overrides: str) -> tuple[Path, object]:
    cfg = compose_config(tmp_path, [*TINY_MODEL, "trainer.max_epochs=1", *overrides])
    trainer, module, datamodule = fit(cfg)
    return Path(trainer.checkpoint_callback.best_model_path), getattr(datamodule, "images", datamodule)


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory):
    """A tiny model trained on image files (train/val/test folders, classes cat and dog) with LoRA, whose checkpoint
    only loads into a backbone wrapped as in training."""
    root = tmp_path_factory.mktemp("predict")
    pets = make_image_folder(root / "pets", per_class=6, split_dirs=("train", "val", "test"))
    ckpt, datamodule = train_tiny(root / "run", *FOLDER, f"data.root={pets}", "strategy=lora")
    return ckpt, datamodule, pets


def test_load_model_on_image_files_matches_the_module_on_the_test_split(folder_run):
    ckpt, datamodule, pets = folder_run
    model = load_model(ckpt, device="cpu")
    assert model.class_names == ["cat", "dog"]
    module = load_module(ckpt)
    images, labels = next(iter(datamodule.split_loader("test", batch_size=64, shuffle=False)))
    with torch.no_grad():
        expected = module(datamodule.preprocess(images)).softmax(dim=-1)
    paths = [path for path, _ in datamodule.samples["test"]]
    assert torch.allclose(model(paths), expected, atol=1e-6)
    # a PIL image, an HWC array and a uint8 tensor of the same file give what its path gives
    first = Image.open(paths[0]).convert("RGB")
    as_tensor = torch.from_numpy(np.asarray(first)).permute(2, 0, 1)
    for same in (first, np.asarray(first), as_tensor):
        assert torch.allclose(model(same), expected[:1], atol=1e-6)
    top = model.predict(paths[:2], top_k=5)
    assert [len(pairs) for pairs in top] == [2, 2]  # only two classes
    assert {name for name, _ in top[0]} == {"cat", "dog"} and top[0][0][1] >= top[0][1][1]


def test_in_memory_data_resizes_the_whole_image_as_eval_does_and_names_digits(tmp_path):
    ckpt, datamodule = train_tiny(tmp_path, "data=digits", "data.image_size=32")
    model = load_model(ckpt, device="cpu")
    assert model.class_names == [str(d) for d in range(10)]
    assert model.preprocessing["geometry"] == "none"
    images, _ = next(iter(datamodule.split_loader("test", batch_size=16, shuffle=False)))  # uint8 [16, 1, 8, 8]
    with torch.no_grad():
        expected = load_module(ckpt)(datamodule.preprocess(images)).softmax(dim=-1)
    assert torch.allclose(model(images), expected, atol=1e-6)


def test_torchvision_datasets_store_their_own_class_names(tmp_path):
    from torchvision.datasets import MNIST

    from finetune.data import TorchvisionDataModule

    root = write_mnist(tmp_path)
    assert TorchvisionDataModule(name="MNIST", root=str(root), download=False).class_names == MNIST.classes


def test_finetune_predict_writes_top_k_and_lists_unreadable_files(folder_run, tmp_path):
    ckpt, _, pets = folder_run
    photos = tmp_path / "photos"
    (photos / "nested").mkdir(parents=True)
    for i, path in enumerate(sorted((pets / "test").rglob("*.png"))):
        (photos / ("nested" if i % 2 else "") / f"{i}.png").write_bytes(path.read_bytes())
    (photos / "notes.txt").write_text("not an image")
    (photos / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    out = tmp_path / "out"
    result = run_main("finetune.predict", f"ckpt_path={ckpt}", f"input={photos}", "top_k=3", "batch_size=4",
                      "num_workers=2", "progress_bar=false", f"hydra.run.dir={out}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    assert len(rows) == 12 and list(rows[0]) == ["path", "class_1", "probability_1", "class_2", "probability_2"]
    model = load_model(ckpt, device="cpu")
    expected = model.predict([row["path"] for row in rows], top_k=3)
    for row, pairs in zip(rows, expected):
        assert [row["class_1"], row["class_2"]] == [name for name, _ in pairs]
        assert float(row["probability_1"]) == pytest.approx(pairs[0][1], abs=1e-6)
    skipped = {Path(row["path"]).name: row["reason"] for row in csv.DictReader((out / "skipped.csv").open())}
    assert "cannot identify image file" in skipped.pop("notes.txt") and "truncated" in skipped.pop("broken.png").lower()
    assert skipped == {}
    assert "predicted 12 image(s)" in result.stdout and "skipped 2 file(s)" in result.stdout
    # a glob and a single file
    result = run_main("finetune.predict", f"ckpt_path={ckpt}", f"input={photos}/**/*.png", "progress_bar=false",
                      f"hydra.run.dir={tmp_path / 'glob'}", cwd=tmp_path)
    assert result.returncode == 0 and len(list(csv.DictReader((tmp_path / "glob" / "predictions.csv").open()))) == 12


@pytest.mark.parametrize("overrides, message", [
    (["input=nowhere/*.jpg"], "input=nowhere/*.jpg is not a file or folder and matches no file"),
    (["ckpt_path=missing.ckpt"], "ckpt_path=missing.ckpt does not exist"),
    (["top_k=0"], "top_k=0 must be at least 1"),
])
def test_finetune_predict_mistakes_are_one_line(folder_run, tmp_path, overrides, message):
    ckpt, _, pets = folder_run
    result = run_main("finetune.predict", f"ckpt_path={ckpt}", f"input={pets}", *overrides, "progress_bar=false",
                      f"hydra.run.dir={tmp_path / 'out'}", cwd=tmp_path)
    assert result.returncode == 2 and message in result.stderr, result.stderr[-2000:]


def test_a_folder_with_no_readable_image_fails_naming_skipped_csv(folder_run, tmp_path):
    ckpt, _, _ = folder_run
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("text")
    result = run_main("finetune.predict", f"ckpt_path={ckpt}", f"input={tmp_path / 'docs'}", "progress_bar=false",
                      f"hydra.run.dir={tmp_path / 'out'}", cwd=tmp_path)
    assert result.returncode == 2 and "could be read as an image; see" in result.stderr


def test_a_checkpoint_from_before_class_names_were_stored_falls_back_to_its_data_config(tmp_path):
    ckpt, _ = train_tiny(tmp_path, "data=fake", "data.num_samples=32", "data.image_size=32", "data.native_size=16",
                         "data.num_classes=4")
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=False)
    expected = load_model(ckpt, device="cpu")
    for key in ("class_names", "preprocessing"):
        del checkpoint["finetune"][key]
    torch.save(checkpoint, tmp_path / "old.ckpt")
    old = load_model(tmp_path / "old.ckpt", device="cpu")
    assert old.class_names == ["0", "1", "2", "3"] and old.preprocessing == expected.preprocessing
