"""data=fake at scale: generated in seeded blocks, so a sample depends on (split_seed, split, index) only."""

from __future__ import annotations

import torch

from finetune.data.sources.fake import BLOCK, FakeDataModule


def test_a_sample_depends_on_split_seed_split_and_index_only_not_on_how_many_are_made():
    small = FakeDataModule(num_samples=10, native_size=8, split_seed=3).splits
    large = FakeDataModule(num_samples=BLOCK + 100, native_size=8, split_seed=3).splits
    for split in ("train", "val", "test"):
        count = len(small[split][0])
        assert torch.equal(small[split][0], large[split][0][:count])
        assert torch.equal(small[split][1], large[split][1][:count])
    assert not torch.equal(large["train"][0][:2], large["val"][0][:2]), "splits draw their own samples"
    other = FakeDataModule(num_samples=10, native_size=8, split_seed=4).splits
    assert not torch.equal(other["train"][0], small["train"][0]), "another split_seed, other images"
    trained_otherwise = FakeDataModule(num_samples=10, native_size=8, split_seed=3, seed=7).splits
    assert torch.equal(trained_otherwise["train"][0], small["train"][0]), "the training seed leaves the data alone"
    again = FakeDataModule(num_samples=BLOCK + 100, native_size=8, split_seed=3).splits
    assert torch.equal(again["train"][0], large["train"][0]) and torch.equal(again["train"][1], large["train"][1])


def test_images_are_uint8_with_every_label_and_the_full_range():
    images, labels = FakeDataModule(num_samples=2000, num_classes=7, native_size=4).splits["train"]
    assert images.dtype == torch.uint8 and images.shape == (2000, 3, 4, 4)
    assert set(labels.tolist()) == set(range(7)) and images.min() == 0 and images.max() == 255
