"""A torchvision dataset class by name (CIFAR10, Flowers102, OxfordIIITPet ...), downloaded when online."""

from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np
import torchvision.datasets
from torch.utils.data import Dataset

from finetune.backbones.base import network_error_types
from finetune.data.sources.hold_out import check_fractions, hold_out
from finetune.data.sources.files import FileImageDataModule
from finetune.errors import ConfigError, OfflineError

# Split names used across torchvision's datasets, in the order tried.
SPLIT_NAMES = {"train": ("train", "trainval"), "val": ("val", "valid"), "test": ("test",)}


class TransformedSubset(Dataset):
    def __init__(self, dataset: Dataset, indices, transform):
        self.dataset, self.indices, self.transform = dataset, list(indices), transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int):
        image, label = self.dataset[self.indices[index]]
        return self.transform(image), int(label)


# Where torchvision's classification datasets keep their labels (read from torchvision 0.29's source): class
# indices (CIFAR, MNIST, ImageFolder, Places365: targets; DTD, Flowers102, Food101, FGVCAircraft, OxfordIIITPet,
# SUN397: _labels; SVHN, STL10, SEMEION: labels; Caltech101, Caltech256: y), or (file or image, label) pairs
# (StanfordCars, GTSRB, FER2013, Imagenette, RenderedSST2: _samples; DatasetFolder: samples; ImageFolder: imgs).
LABEL_ATTRIBUTES = ("targets", "_labels", "labels", "y")
PAIR_ATTRIBUTES = ("_samples", "samples", "imgs")


def class_labels(dataset, name: str) -> np.ndarray:
    """The class index of every sample of a torchvision dataset, read the way it stores them; a one-line ConfigError
    for a dataset without class indices (segmentation, detection, captions, unlabelled splits)."""
    found = next(((a, getattr(dataset, a)) for a in LABEL_ATTRIBUTES if getattr(dataset, a, None) is not None), None)
    if found is None:
        found = next(((a, [pair[1] for pair in getattr(dataset, a)]) for a in PAIR_ATTRIBUTES
                      if getattr(dataset, a, None) is not None), None)
    if found is None:
        raise ConfigError(f"{name} keeps no class labels (none of {', '.join(LABEL_ATTRIBUTES + PAIR_ATTRIBUTES)}): "
                          f"it is not a classification dataset this datamodule can split; use data=image_folder")
    attribute, values = found
    try:
        labels = np.asarray(values)
    except ValueError:  # ragged: per-sample lists of targets
        labels = np.asarray(values, dtype=object)
    if labels.ndim != 1 or len(labels) != len(dataset) or not np.issubdtype(labels.dtype, np.integer):
        raise ConfigError(f"{name}'s {attribute} are not one class index per sample (a segmentation, detection or "
                          f"unlabelled split?): this datamodule trains classifiers; use data=image_folder")
    return labels


class TorchvisionDataModule(FileImageDataModule):
    def __init__(self, name: str, root: str = "data", download: bool = True, val_fraction: float = 0.1,
                 test_fraction: float = 0.1, split_seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        candidates = sorted(n for n in torchvision.datasets.__all__ if n[0].isupper())
        if name not in candidates:
            raise ConfigError(f"data.name={name!r} is not a torchvision dataset; choose one of: {', '.join(candidates)}")
        self.name, self.root, self.download = name, str(Path(root).expanduser()), download
        check_fractions(val_fraction, test_fraction)
        self.val_fraction, self.test_fraction, self.split_seed = val_fraction, test_fraction, split_seed
        self._datasets: dict[str, tuple[Dataset, np.ndarray]] | None = None

    def prepare_data(self) -> None:
        """Once per node (Lightning runs it on local rank 0; the other ranks wait): download, then the image store."""
        self._downloading = self.download
        try:
            self.datasets  # noqa: B018 - opening the splits downloads what is missing
        finally:
            self._downloading = False
        super().prepare_data()

    def _open(self, **split_kwargs) -> Dataset:
        cls = getattr(torchvision.datasets, self.name)
        if not getattr(self, "_downloading", False):  # outside prepare_data: use the files, or download if none
            try:
                return cls(self.root, download=False, **split_kwargs)
            except RuntimeError:
                if not self.download:
                    raise OfflineError(f"{self.name} is not under {self.root} and download is off; set "
                                       f"data.download=true when online, or use data=image_folder data.root=...")
        try:
            return cls(self.root, download=self.download, **split_kwargs)
        except network_error_types() as err:
            raise OfflineError(f"could not download {self.name} into {self.root} ({type(err).__name__}); offline? "
                               f"put its files under data.root, or use data=image_folder data.root=...") from err
        except RuntimeError as err:  # torchvision: "Dataset not found or corrupted. You can use download=True ..."
            raise OfflineError(f"{self.name} is not under {self.root} and download is off ({err}); set "
                               f"data.download=true when online, or use data=image_folder data.root=...") from err

    def _split(self, split: str) -> Dataset | None:
        params = inspect.signature(getattr(torchvision.datasets, self.name)).parameters
        if "train" in params:
            return self._open(train=True) if split == "train" else self._open(train=False) if split == "test" else None
        for candidate in SPLIT_NAMES[split]:
            try:
                return self._open(split=candidate)
            except ValueError:  # verify_str_arg: not one of this dataset's splits
                continue
        return None

    @property
    def datasets(self) -> dict[str, tuple[Dataset, np.ndarray]]:
        if self._datasets is None:
            params = inspect.signature(getattr(torchvision.datasets, self.name)).parameters
            if "train" not in params and "split" not in params:  # one set of images (Caltech101): hold out val, test
                self._datasets = self._held_out_splits(self._open())
                return self._datasets
            train, val, test = self._split("train"), self._split("val"), self._split("test")
            if train is None or test is None:
                raise ConfigError(f"{self.name} has no train/test splits this datamodule recognises")
            index = np.arange(len(train))
            if val is None:  # carve a stratified val split out of train
                train_idx, val_idx = hold_out(class_labels(train, f"{self.name}'s train split"), self.val_fraction,
                                              self.split_seed, "data.val_fraction", getattr(train, "classes", None),
                                              f"{self.name}'s train split")
                splits = {"train": (train, train_idx), "val": (train, val_idx)}
            else:
                splits = {"train": (train, index), "val": (val, np.arange(len(val)))}
            splits["test"] = (test, np.arange(len(test)))
            self._datasets = splits
        return self._datasets

    def _held_out_splits(self, whole: Dataset) -> dict[str, tuple[Dataset, np.ndarray]]:
        """test (data.test_fraction), then val (data.val_fraction of the whole) held out of a dataset without
        splits, stratified and seeded (data.split_seed)."""
        labels, classes = class_labels(whole, self.name), getattr(whole, "classes", None)
        rest, test = hold_out(labels, self.test_fraction, self.split_seed, "data.test_fraction", classes, self.name)
        train, val = hold_out(labels[rest], self.val_fraction / (1 - self.test_fraction), self.split_seed,
                              "data.val_fraction", classes, self.name, 1 - self.test_fraction)
        self.test_split = f"held out {self.test_fraction:.0%} of {self.name} (data.split_seed={self.split_seed})"
        return {"train": (whole, rest[train]), "val": (whole, rest[val]), "test": (whole, test)}

    @property
    def num_classes(self) -> int:
        dataset = self.datasets["train"][0]
        classes = getattr(dataset, "classes", None)
        if classes is not None:
            return len(classes)
        return int(class_labels(dataset, f"{self.name}'s train split").max()) + 1

    @property
    def class_names(self) -> list[str]:
        classes = getattr(self.datasets["train"][0], "classes", None)
        return [str(c) for c in classes] if classes is not None else super().class_names

    @property
    def dataset_id(self) -> dict:
        sizes = {split: len(indices) for split, (_, indices) in self.datasets.items()}
        return {"name": f"torchvision.{self.name}", "root": str(Path(self.root).resolve()), "sizes": sizes,
                "val_fraction": self.val_fraction, "split_seed": self.split_seed}

    def split_dataset(self, split: str, train_transforms: bool = False, transform=None) -> TransformedSubset:
        dataset, indices = self.datasets[split]
        return TransformedSubset(dataset, indices, transform or self.transforms(train=train_transforms))
