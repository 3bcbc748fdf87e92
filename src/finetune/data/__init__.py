"""Data, by kind: `sources/` (where images come from), `storage/` (how they are stored on disk), `features/` (the
cached features behind strategy=cached); `base` is the datamodule interface they share, `preprocessing` the eval
geometry and normalisation, `cache_cli` the finetune-cache command."""

from finetune.data.base import ImageDataModule
from finetune.data.sources.digits import DigitsDataModule
from finetune.data.sources.fake import FakeDataModule
from finetune.data.sources.image_folder import ImageFolderDataModule
from finetune.data.sources.torchvision import TorchvisionDataModule

__all__ = ["ImageDataModule", "DigitsDataModule", "FakeDataModule", "ImageFolderDataModule", "TorchvisionDataModule"]
