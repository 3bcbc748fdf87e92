"""Datamodules (digits, image folder, torchvision datasets, fake) and the feature cache behind `cached`."""

from finetune.data.base import ImageDataModule
from finetune.data.digits import DigitsDataModule
from finetune.data.fake import FakeDataModule
from finetune.data.image_folder import ImageFolderDataModule
from finetune.data.torchvision import TorchvisionDataModule

__all__ = ["ImageDataModule", "DigitsDataModule", "FakeDataModule", "ImageFolderDataModule", "TorchvisionDataModule"]
