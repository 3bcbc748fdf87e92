"""Class-per-folder images: `root/{train,val[,test]}/<class>/*.jpg`, or one `root/<class>/*` split by fractions.
Without a test/ folder, `test_fraction` of train/ is held out as the test split (seeded, stratified): never val,
which picks the checkpoint. `test_fraction: 0` tests on val and says so loudly.

An unreadable image fails the run naming the file (never a silent skip that trains on less than you think);
`verify_images: true` finds every bad file before training starts.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from torch.utils.data import Dataset

from finetune.data.sources.file_listing import split_identity
from finetune.data.sources.files import FileImageDataModule
from finetune.data.sources.hold_out import check_fractions, hold_out
from finetune.data.preprocessing import CorruptImageError, load_rgb
from finetune.run.identity import digest
from finetune.errors import ConfigError
from finetune.run.progress import Progress

log = logging.getLogger(__name__)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class LabelledFiles(Dataset):
    def __init__(self, samples: list[tuple[str, int]], transform):
        self.samples, self.transform = samples, transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        return self.transform(load_rgb(path)), label


def scan_class_folders(folder: Path, classes: list[str] | None = None) -> tuple[list[str], list[tuple[str, int]]]:
    """(class names, [(path, label)]) of `folder/<class>/<image>`; every class folder must hold an image."""
    if not folder.is_dir():
        raise ConfigError(f"data folder {folder} does not exist")
    found = sorted(d.name for d in os.scandir(folder) if d.is_dir() and not d.name.startswith("."))
    if not found:
        raise ConfigError(f"data folder {folder} has no class folders (expected {folder}/<class>/<image>)")
    if classes is not None and found != classes:
        raise ConfigError(f"class folders of {folder} ({', '.join(found)}) differ from train's ({', '.join(classes)})")
    samples = []
    for label, name in enumerate(found):
        files = sorted(str(p) for p in (folder / name).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise ConfigError(f"class folder {folder / name} has no images ({', '.join(IMAGE_EXTENSIONS)})")
        samples += [(f, label) for f in files]
    return found, samples


class ImageFolderDataModule(FileImageDataModule):
    def __init__(self, root: str, val_fraction: float = 0.1, test_fraction: float = 0.1, split_seed: int = 0,
                 verify_images: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.root = Path(root).expanduser().resolve()
        if not self.root.is_dir():
            raise ConfigError(f"data.root={root} does not exist (expected class folders, or train/ and val/)")
        check_fractions(val_fraction, test_fraction, test_may_be_zero=True)
        self.val_fraction, self.test_fraction, self.split_seed = val_fraction, test_fraction, split_seed
        self.verify_images = verify_images
        self._samples: dict[str, list[tuple[str, int]]] | None = None
        self._classes: list[str] = []
        self._split_ids: dict[str, dict] = {}
        self.test_split = "test"  # where the test split comes from, once scanned (metrics.json reports it)

    @property
    def samples(self) -> dict[str, list[tuple[str, int]]]:
        if self._samples is None:
            self._samples = self._scan()
            for split, items in self._samples.items():
                if not items:
                    raise ConfigError(f"the {split} split of {self.root} is empty")
            if self.verify_images:
                self._verify()
        return self._samples

    def _scan(self) -> dict[str, list[tuple[str, int]]]:
        if not (self.root / "train").is_dir():
            self._classes, every = scan_class_folders(self.root)
            rest, test = self._hold_out(every, self.test_fraction, "data.test_fraction")
            train, val = self._hold_out(rest, self.val_fraction / (1 - self.test_fraction), "data.val_fraction",
                                        1 - self.test_fraction)
            if not test:  # data.test_fraction=0: documented as testing on val
                self.test_split = f"val (data.test_fraction=0 on {self.root}: test accuracy is NOT held out)"
                log.warning("data.test_fraction=0: testing on val, the split that picked the checkpoint; the test "
                            "accuracy is optimistic")
                return {"train": train, "val": val, "test": val}
            self.test_split = f"held out {self.test_fraction:.0%} of {self.root} (data.split_seed={self.split_seed})"
            return {"train": train, "val": val, "test": test}
        self._classes, train = scan_class_folders(self.root / "train")
        _, val = scan_class_folders(self.root / "val", self._classes)
        if (self.root / "test").is_dir():
            self.test_split = f"{self.root / 'test'}"
            return {"train": train, "val": val, "test": scan_class_folders(self.root / "test", self._classes)[1]}
        if self.test_fraction > 0:  # never test on val: it picked the checkpoint
            train, test = self._hold_out(train, self.test_fraction, "data.test_fraction")
            self.test_split = (f"held out {self.test_fraction:.0%} of {self.root / 'train'} "
                               f"(no test/ folder; data.test_fraction, data.split_seed={self.split_seed})")
            log.info("no test/ folder under %s: the test split is %s", self.root, self.test_split)
            return {"train": train, "val": val, "test": test}
        self.test_split = "val (no test/ folder and data.test_fraction=0: test accuracy is NOT held out)"
        log.warning("no test/ folder under %s and data.test_fraction=0: testing on val, the split that picked the "
                    "checkpoint; the test accuracy is optimistic", self.root)
        return {"train": train, "val": val, "test": val}

    def _hold_out(self, samples: list[tuple[str, int]], fraction: float, key: str, of_whole: float = 1.0):
        """(rest, held out): a stratified, seeded share of `samples`."""
        rest, held = hold_out([label for _, label in samples], fraction, self.split_seed, key, self._classes,
                              str(self.root), of_whole)
        return [samples[i] for i in rest], [samples[i] for i in held]

    def _verify(self) -> None:
        paths = sorted({p for items in self._samples.values() for p, _ in items})

        def bad(path: str) -> str | None:
            try:
                load_rgb(path).load()
            except CorruptImageError as err:
                return str(err)
            return None

        problems = []
        with (ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool,
              Progress(f"verifying images under {self.root}", len(paths), unit="images") as progress):
            for problem in pool.map(bad, paths):
                progress.advance(1)
                if problem:
                    problems.append(problem)
        if problems:
            raise CorruptImageError(f"{len(problems)} unreadable image(s) under {self.root}; first: {problems[0]}")
        log.info("verified %d images under %s", len(paths), self.root)

    @property
    def num_classes(self) -> int:
        self.samples  # noqa: B018 - scanning fills the class list
        return len(self._classes)

    @property
    def class_names(self) -> list[str]:
        self.samples  # noqa: B018 - scanning fills the class list
        return list(self._classes)

    def split_id(self, split: str) -> dict:
        """One split's identity (file_listing.split_identity: its listing and a few files' stats), computed once."""
        if split not in self._split_ids:
            self._split_ids[split] = {"name": "image_folder", "root": str(self.root), "split": split,
                                      **split_identity(self.samples[split])}
        return self._split_ids[split]

    @property
    def dataset_id(self) -> dict:
        """The three splits' identities in one digest: O(splits x SAMPLED_FILES) stats, once per datamodule."""
        splits = [self.split_id(split) for split in ("train", "val", "test")]
        return {"name": "image_folder", "root": str(self.root), "files": digest(splits)}

    def split_dataset(self, split: str, train_transforms: bool = False, transform=None) -> LabelledFiles:
        return LabelledFiles(self.samples[split], transform or self.transforms(train=train_transforms))
