"""The datamodule behind staged strategies with a phase on cached features (lp_ft's probe): the epochs of such a
phase train and validate on stored features, all others on images; testing and prediction always use images."""

from __future__ import annotations

from lightning import LightningDataModule

from finetune.data.base import ImageDataModule
from finetune.data.features.cached import CachedFeatureDataModule


class PhaseInputs(LightningDataModule):
    def __init__(self, images: ImageDataModule, features: CachedFeatureDataModule, strategy):
        super().__init__()
        self.images, self.features, self.strategy = images, features, strategy

    @property
    def num_classes(self) -> int:
        return self.images.num_classes

    @property
    def report(self) -> dict:
        return self.features.report

    def prepare_data(self) -> None:
        self.images.trainer = self.features.trainer = self.trainer  # under DDP the image store is built in setup
        self.images.prepare_data()

    def setup(self, stage: str | None = None) -> None:
        self.images.trainer = self.features.trainer = self.trainer
        self.images.setup(stage)  # under DDP every rank builds its share of an image store here
        if stage in ("fit", None):
            # the probe trains and validates on features; the test runs on images: no test entry to extract or read
            self.features.setup(stage, splits=("train", "val"))
            # Lightning asks for the train and val loaders again at every epoch, so a phase boundary switches inputs
            self.trainer.reload_dataloaders_every_n_epochs = 1

    def _source(self) -> LightningDataModule:
        epoch = self.trainer.current_epoch if self.trainer is not None else 0
        on_features = self.strategy.phases()[self.strategy.phase_at(epoch)].inputs == "cached"
        return self.features if on_features else self.images

    def train_dataloader(self):
        return self._source().train_dataloader()

    def val_dataloader(self):
        return self._source().val_dataloader()

    def test_dataloader(self):
        return self.images.test_dataloader()

    def predict_dataloader(self):
        return self.images.predict_dataloader()

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        source = self.images if batch[0].ndim == 4 else self.features  # images [B, C, H, W]; features [B, D]
        return source.on_after_batch_transfer(batch, dataloader_idx)
