"""torchvision datasets keep their labels under different names (targets, _labels, labels, y) or only inside their
(file, label) sample pairs: every one of those splits, and one without class labels is refused in one line."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torchvision.datasets
from PIL import Image

from finetune.data.sources.torchvision import LABEL_ATTRIBUTES, PAIR_ATTRIBUTES, TorchvisionDataModule
from finetune.errors import ConfigError

LABELS = [i % 4 for i in range(40)]  # 4 classes of 10


class FakeSplitDataset:
    """Shaped like torchvision's split= datasets; subclasses say where the labels live."""

    def __init__(self, root, split="train", transform=None, target_transform=None, download=False):
        if split not in ("train", "test"):
            raise ValueError(f"Unknown value '{split}' for argument split")
        self.labels_ = LABELS if split == "train" else LABELS[:8]
        self.store()

    def store(self):
        raise NotImplementedError

    def __len__(self):
        return len(self.labels_)

    def __getitem__(self, index):
        return Image.new("RGB", (8, 8), (index, 0, 0)), self.labels_[index]


class StanfordCars(FakeSplitDataset):  # (path, label) pairs in _samples
    def store(self):
        self._samples = [(f"{i}.jpg", label) for i, label in enumerate(self.labels_)]


class GTSRB(FakeSplitDataset):
    def store(self):
        self._samples = [(f"{i}.ppm", label) for i, label in enumerate(self.labels_)]


class DTD(FakeSplitDataset):  # _labels, and no val split here
    def store(self):
        self._labels = list(self.labels_)


class Kitti(FakeSplitDataset):  # detection: targets are annotation files, not class indices
    def store(self):
        self.targets = [f"{i}.txt" for i in range(len(self.labels_))]


class PCAM(FakeSplitDataset):  # labels only inside its files: nothing to read them from
    def store(self):
        pass


class Caltech101:  # no splits at all; labels in y
    def __init__(self, root, target_type="category", transform=None, target_transform=None, download=False):
        self.y = list(LABELS)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, index):
        return Image.new("RGB", (8, 8)), self.y[index]


@pytest.mark.parametrize("fake", [StanfordCars, GTSRB, DTD, Caltech101])
def test_labels_are_read_where_each_dataset_keeps_them_and_the_split_is_stratified(monkeypatch, tmp_path, fake):
    monkeypatch.setattr(torchvision.datasets, fake.__name__, fake)
    data = TorchvisionDataModule(name=fake.__name__, root=str(tmp_path), download=False, val_fraction=0.2,
                                 image_size=8)
    splits = data.datasets
    assert data.num_classes == 4
    labels = {name: [dataset[i][1] for i in indices] for name, (dataset, indices) in splits.items()}
    assert np.bincount(labels["val"]).tolist() == [2, 2, 2, 2], "stratified: 20% of every class"
    if fake is Caltech101:  # test held out of the one set first (10%), then val (20% of the whole)
        assert np.bincount(labels["test"]).tolist() == [1, 1, 1, 1] and len(labels["train"]) == 28
        assert "held out 10% of Caltech101" in data.test_split
        every = np.concatenate([splits[name][1] for name in ("train", "val", "test")])
        assert sorted(every.tolist()) == list(range(40)), "each image in one split"
    else:
        assert len(labels["train"]) == 32 and len(labels["test"]) == 8


@pytest.mark.parametrize("fake,expected", [
    (Kitti, r"^Kitti's train split's targets are not one class index per sample .*data=image_folder$"),
    (PCAM, r"^PCAM's train split keeps no class labels \(none of targets, _labels, labels, y, _samples, samples, "
           r"imgs\): .*data=image_folder$")])
def test_a_dataset_without_class_labels_is_refused_in_one_line(monkeypatch, tmp_path, fake, expected):
    monkeypatch.setattr(torchvision.datasets, fake.__name__, fake)
    with pytest.raises(ConfigError, match=expected):
        TorchvisionDataModule(name=fake.__name__, root=str(tmp_path), download=False, image_size=8).num_classes


@pytest.mark.parametrize("name,attribute", [("CIFAR10", "targets"), ("MNIST", "targets"), ("Flowers102", "_labels"),
                                            ("OxfordIIITPet", "_labels"), ("SVHN", "labels"), ("STL10", "labels"),
                                            ("Caltech101", "y"), ("Caltech256", "y"), ("StanfordCars", "_samples"),
                                            ("GTSRB", "_samples"), ("Imagenette", "_samples"),
                                            ("ImageFolder", "samples")])
def test_the_installed_torchvision_keeps_labels_where_the_fakes_do(name, attribute):
    """Pins the attribute names read above to the installed torchvision's source."""
    cls = getattr(torchvision.datasets, name)
    source = "".join(inspect.getsource(c) for c in cls.__mro__ if c.__module__.startswith("torchvision.datasets"))
    assert f"self.{attribute} =" in source or f"self.{attribute}: " in source or f", self.{attribute} =" in source
    assert attribute in LABEL_ATTRIBUTES + PAIR_ATTRIBUTES
    params = inspect.signature(cls).parameters
    if name.startswith("Caltech"):
        assert "split" not in params and "train" not in params, "no splits: held out by data.test_fraction"
