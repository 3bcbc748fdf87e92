"""Image files at speed and resumed exactly: the decode-once store, augmentation on the device, per-sample seeds."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from finetune.data.storage.device_augment import crop_boxes, random_resized_crop_flip
from finetune.build import build
from finetune.train import train
from tests.conftest import TINY, compose_config, make_image_folder
from tests.test_cli import start_cli

BASE = [o for o in TINY if not o.startswith("data")]


def noisy_folder(root: Path, sizes=((50, 37), (37, 61), (64, 64), (45, 90), (120, 33), (33, 33))) -> Path:
    """root/{train,val}/{a,b}/*.jpg|png of random noise at many aspect ratios: resizing and cropping show in every
    pixel."""
    from PIL import Image

    generator = np.random.default_rng(0)
    for split in ("train", "val"):
        for label in ("a", "b"):
            folder = root / split / label
            folder.mkdir(parents=True)
            for i, (w, h) in enumerate(sizes):
                pixels = generator.integers(0, 256, (h, w, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.{'jpg' if i % 2 else 'png'}")
    return root


def image_run(root: Path, *extra: str) -> list[str]:
    return [*BASE, "data=image_folder", f"data.root={root}", "data.image_size=32", "data.batch_size=4",
            "data.num_workers=0", "strategy=freeze", *extra]


@pytest.mark.parametrize("decoder", ["pil", "torchvision"])
def test_the_stores_eval_images_equal_the_pil_paths(tmp_path, decoder):
    """Stored by PIL in workers, or by torchvision's batched decode_jpeg (here on the CPU; JPEGs and PNGs mixed)."""
    root = noisy_folder(tmp_path / "images")
    stored, _ = build(compose_config(tmp_path, image_run(root, "data.store=true", "data.crop_pct=0.8",
                                                         f"data.store_decode={decoder}")))
    files, _ = build(compose_config(tmp_path, image_run(root, "data.crop_pct=0.8")))
    stored.prepare_data()
    assert stored.store.size == 40 and stored.store.report["images_decoded"] == 12 + 12  # train (and test) + val
    for split in ("train", "val", "test"):
        want = torch.cat([b[0] for b in files.split_loader(split, 64, shuffle=False)])
        got = torch.cat([b[0] for b in stored.split_loader(split, 64, shuffle=False)])
        assert got.shape == want.shape == (len(want), 3, 32, 32)
        assert (got.int() - want.int()).abs().max() <= 1, f"{split}: within one uint8 level of the PIL path"
    # what extraction and prediction see: subset_loader in any order
    order = torch.tensor([3, 0, 2])
    want = next(iter(files.subset_loader("val", order, 3)))[0]
    assert torch.equal(next(iter(stored.subset_loader("val", order, 3)))[0], want)


def test_device_augmentation_draws_per_sample_parameters_from_seed_epoch_and_index():
    index = torch.arange(64)
    top, left, h, w, flip = crop_boxes(42, 3, index, 96, 128)
    boxes = torch.stack([top, left, h, w], dim=1)
    assert len(torch.unique(boxes, dim=0)) == 64 and 0 < flip.sum() < 64, "every sample its own crop"
    area, ratio = (h * w).double() / (96 * 128), w.double() / h
    assert area.min() >= 0.07 and area.max() <= 1 and ratio.min() >= 0.74 and ratio.max() <= 1.34
    assert torch.equal(torch.stack(crop_boxes(42, 3, index, 96, 128)[:4], dim=1), boxes), "reproducible"
    subset = torch.tensor([40, 7, 7])
    assert torch.equal(torch.stack(crop_boxes(42, 3, subset, 96, 128)[:4], dim=1), boxes[subset]), \
        "a sample's crop does not depend on the batch it is in"
    assert not torch.equal(torch.stack(crop_boxes(42, 4, index, 96, 128)[:4], dim=1), boxes), "another epoch"
    assert not torch.equal(torch.stack(crop_boxes(43, 3, index, 96, 128)[:4], dim=1), boxes), "another seed"
    images = torch.randint(0, 256, (64, 3, 96, 128), dtype=torch.uint8)
    for method in ("interpolate", "roi_align"):  # the CPU's and the GPU's
        out = random_resized_crop_flip(images, index, 42, 3, 32, method=method)
        alone = random_resized_crop_flip(images[subset], subset, 42, 3, 32, method=method)
        assert out.shape == (64, 3, 32, 32) and out.dtype == torch.uint8, "uint8 in, uint8 out"
        assert torch.equal(out[subset], alone), method
    channels_last = images.contiguous(memory_format=torch.channels_last)  # the store's layout: the same pixels
    assert torch.equal(random_resized_crop_flip(channels_last, index, 42, 3, 32),
                       random_resized_crop_flip(images, index, 42, 3, 32))


def test_a_whole_crop_without_flip_is_the_resized_image():
    images = torch.randint(0, 256, (1, 3, 8, 8), dtype=torch.uint8)
    index = torch.tensor([0])
    seed = next(s for s in range(1000) if (lambda b: b[2].item() == 8 and b[3].item() == 8 and not b[4].item())(
        crop_boxes(s, 0, index, 8, 8, scale=(1.0, 1.0), ratio=(1.0, 1.0))))
    for method in ("interpolate", "roi_align"):
        out = random_resized_crop_flip(images, index, seed, 0, 8, scale=(1.0, 1.0), ratio=(1.0, 1.0), method=method)
        assert torch.equal(out, images), method


@pytest.mark.parametrize("augment", ["random_resized_crop", "flip"])
def test_store_batches_augmented_in_cpu_workers_equal_those_augmented_in_process(tmp_path, augment):
    """A CPU run with workers crops in the workers (a core each); the crops are the same function of (seed, epoch,
    index) as on the device, so the model input is bitwise the same."""
    root = noisy_folder(tmp_path / "images", sizes=((50, 37), (37, 61), (64, 64), (45, 90)) * 4)
    batches = {}
    for workers in (0, 2):
        images, _ = build(compose_config(tmp_path, image_run(root, "data.store=true", f"data.augment={augment}",
                                                             f"data.num_workers={workers}")))
        images.prepare_data()
        loader = images.split_loader("train", 4, shuffle=True, drop_last=True)
        assert (type(loader).__name__ == "WorkerBatchLoader") == (workers > 0)
        batches[workers] = [images.on_after_batch_transfer(batch, 0) for batch in loader]
    assert len(batches[0]) == len(batches[2]) == 7  # 28 train images (4 of 32 held out to test)
    for (inputs, labels), (expected, expected_labels) in zip(batches[2], batches[0]):
        assert torch.equal(labels, expected_labels) and torch.equal(inputs, expected)


def test_a_changed_file_changes_the_stores_key_and_is_decoded_again(tmp_path):
    from PIL import Image

    root = noisy_folder(tmp_path / "images")
    first, _ = build(compose_config(tmp_path, image_run(root, "data.store=true")))
    first.prepare_data()
    again, _ = build(compose_config(tmp_path, image_run(root, "data.store=true")))
    again.prepare_data()
    assert again.store.report["images_decoded"] == 0 and again.store.report["store_hit"]
    changed = root / "val" / "a" / "2.png"
    Image.new("RGB", (64, 64), (255, 0, 0)).save(changed)
    third, _ = build(compose_config(tmp_path, image_run(root, "data.store=true")))
    third.prepare_data()
    assert third.store.report["images_decoded"] > 0, "new pixels, not stale ones"
    val = torch.cat([b[0] for b in third.split_loader("val", 64, shuffle=False)])
    red = (val[:, 0].float().mean((1, 2)) > 250) & (val[:, 1].float().mean((1, 2)) < 5)
    assert red.sum() == 1


@pytest.mark.parametrize("store,workers", [("false", 2), ("true", 0), ("true", 2)])
def test_killed_mid_epoch_with_random_augmentation_and_resumed_gives_the_uninterrupted_weights_bitwise(tmp_path, store,
                                                                                                       workers):
    """PIL in workers; the store augmented in this process; the store augmented in CPU workers."""
    root = make_image_folder(tmp_path / "images", per_class=12)  # 22 train images (2 held out to test), batch 4: 5 steps
    run = image_run(root, "strategy=freeze", "data.augment=random_resized_crop", f"data.store={store}",
                    "trainer.deterministic=true", "callbacks.last_checkpoint.every_n_train_steps=2",
                    f"data.num_workers={workers}")
    killed_dir = tmp_path / "killed"
    # killed mid-epoch 2 (steps 5-9); last.ckpt holds step 8
    killed = start_cli("finetune.train", *run, f"hydra.run.dir={killed_dir}",
                       "+callbacks.kill._target_=tests.run.faults.KillAtStep", "+callbacks.kill.step=9", cwd=tmp_path,
                       log=tmp_path / "killed.log")
    # the uninterrupted run in this process while the killed one runs in its own (SIGKILL needs a process of its own)
    (tmp_path / "straight").mkdir()
    train(compose_config(tmp_path / "straight", run))
    assert killed.wait(timeout=300) == -9, (tmp_path / "killed.log").read_text()[-3000:]
    checkpoint = killed_dir / "checkpoints" / "last.ckpt"
    assert torch.load(checkpoint, weights_only=False)["global_step"] == 8
    train(compose_config(killed_dir, [*run, f"ckpt_path={checkpoint}"]))
    expected, actual = (torch.load(folder / "checkpoints" / "last.ckpt", weights_only=True)
                        for folder in (tmp_path / "straight", killed_dir))
    assert expected["global_step"] == actual["global_step"] == 10
    for name, tensor in expected["state_dict"].items():
        assert torch.equal(tensor, actual["state_dict"][name]), f"{name} differs after resume"


def test_ddp_ranks_split_the_store_build_and_train_as_one_process(tmp_path):
    """Two gloo processes on a torchvision dataset (MNIST's files, written here), with random augmentation on the
    device: the store is not built in prepare_data (local rank 0 alone, the others waiting in a barrier) but by both
    ranks in setup, each decoding its share of the shards, every image once in all; and since a sample's crop depends
    on (seed, epoch, index) only and each step's two rank batches are the one process's batch, DDP with 8 per rank
    ends where one process with 16 ends (up to float summation order)."""
    from tests.conftest import write_mnist

    mnist = write_mnist(tmp_path / "mnist")  # 200 train (20 of them carved out for val), 20 test
    runs = {}
    for name, batch, trainer in (("ddp", 8, "ddp_cpu"), ("single", 16, "cpu")):
        log = tmp_path / f"prepare_{name}.txt"
        overrides = [*BASE, "data=torchvision", "data.name=MNIST", f"data.root={mnist}", "data.download=false",
                     "data._target_=tests.run.faults.counting_torchvision", f"+data.log={log}", "data.image_size=32",
                     f"data.batch_size={batch}", "data.num_workers=0", "data.augment=random_resized_crop",
                     "data.store=true", f"data.store_dir={tmp_path / name / 'store'}", "data.store_shard_rows=16",
                     "strategy=freeze",
                     f"trainer={trainer}", "trainer.max_epochs=2",
                     "+callbacks.store._target_=tests.run.faults.RecordImageStore",
                     "+callbacks.store.output_dir=${paths.output_dir}"]
        if name == "ddp":  # the ranks need processes of their own
            runs[name] = start_cli("finetune.train", *overrides, f"hydra.run.dir={tmp_path / name}", cwd=tmp_path,
                                   log=tmp_path / f"{name}.log")
        else:  # the one process: this one, while the ranks run
            (tmp_path / name).mkdir(exist_ok=True)
            train(compose_config(tmp_path / name, overrides))
    assert runs["ddp"].wait(timeout=600) == 0, (tmp_path / "ddp.log").read_text()[-3000:]
    for name in ("ddp", "single"):
        # Lightning calls prepare_data at each stage (fit, then test), on local rank 0 only: never on rank 1
        assert (tmp_path / f"prepare_{name}.txt").read_text().split() == ["0", "0"], "prepare_data: rank 0 of the node"
    reports = [json.loads((tmp_path / "ddp" / f"store_rank{rank}.json").read_text()) for rank in (0, 1)]
    # 16 images a shard: train's 180 in 12 shards (6 each), val's and test's 20 in 2 (one each)
    assert [r["images_decoded"] for r in reports] == [96 + 16 + 16, 84 + 4 + 4], "each rank decoded its share"
    assert json.loads((tmp_path / "single" / "metrics.json").read_text())["images_decoded"] == 220
    expected, actual = (torch.load(tmp_path / name / "checkpoints" / "last.ckpt", weights_only=True)
                        for name in ("single", "ddp"))
    assert expected["global_step"] == actual["global_step"] > 0
    for name, tensor in expected["state_dict"].items():
        torch.testing.assert_close(actual["state_dict"][name], tensor, rtol=0, atol=1e-5, msg=name)


@pytest.mark.parametrize("decoder", ["pil", "torchvision"])
def test_an_unreadable_file_is_named_while_the_store_is_built(tmp_path, decoder):
    from finetune.data.preprocessing import CorruptImageError

    root = noisy_folder(tmp_path / "images")
    whole = (root / "val" / "b" / "1.jpg").read_bytes()
    for name, content in (("broken.jpg", b"not a jpeg"), ("truncated.jpg", whole[:200])):
        (root / "val" / "b" / name).write_bytes(content)
        images, _ = build(compose_config(tmp_path, image_run(root, "data.store=true",
                                                             f"data.store_decode={decoder}")))
        with pytest.raises(CorruptImageError, match=rf"cannot read image .*{name}"):
            images.prepare_data()
        (root / "val" / "b" / name).unlink()


@pytest.mark.parametrize("augment", ["random_resized_crop", "flip"])
def test_pil_path_augmentation_is_a_function_of_seed_epoch_and_index_and_leaves_global_rng_alone(tmp_path, monkeypatch,
                                                                                                augment):
    """The PIL path reseeded torch's global RNG per sample (torch.manual_seed, which also reseeds every CUDA
    generator, and never restores those): with num_workers=0 on a GPU, dropout drew from a data-derived seed."""
    root = noisy_folder(tmp_path / "images", sizes=((50, 37), (37, 61), (64, 64), (45, 90)) * 4)

    def loader(workers: int, epoch: int = 0, augmentation: str = augment):
        images, _ = build(compose_config(tmp_path, image_run(root, f"data.augment={augmentation}",
                                                             f"data.num_workers={workers}")))
        batches = images.split_loader("train", 4, shuffle=True, drop_last=True)
        batches.sampler.epoch = epoch
        return batches

    first = loader(0)  # building the model draws from the global RNG; reading the data must not
    torch.manual_seed(1234)
    cpu_state = torch.get_rng_state()
    reseeded = []
    for name in ("manual_seed", "manual_seed_all", "seed", "seed_all", "set_rng_state", "set_rng_state_all"):
        monkeypatch.setattr(torch.cuda, name, lambda *args, _name=name, **kwargs: reseeded.append(_name))
    in_process = list(first)
    assert reseeded == [], "the CUDA generators were reseeded"
    assert torch.equal(torch.get_rng_state(), cpu_state), "the global CPU generator moved"
    assert torch.equal(torch.rand(3), torch.rand(3, generator=torch.Generator().manual_seed(1234))), \
        "the next global draws are those seed 1234 gives"

    torch.manual_seed(99)  # another global state, workers: the same samples (a function of seed, epoch, index)
    for (inputs, labels), (expected, expected_labels) in zip(loader(2), in_process, strict=True):
        assert torch.equal(labels, expected_labels) and torch.equal(inputs, expected)
    inputs = torch.cat([b[0] for b in in_process])
    assert inputs.shape == (28, 3, 32, 32) and inputs.dtype == torch.uint8
    assert not torch.equal(torch.cat([b[0] for b in loader(0, epoch=1)]), inputs), "another epoch, other draws"
    if augment == "flip":  # the eval crop of each image or its mirror, some of each
        plain = torch.cat([b[0] for b in loader(0, augmentation="none")])
        same = [torch.equal(a, b) for a, b in zip(inputs, plain)]
        mirrored = [torch.equal(a, b.flip(-1)) and not s for a, b, s in zip(inputs, plain, same)]
        assert all(s or m for s, m in zip(same, mirrored)) and 0 < sum(mirrored) < 28
    else:  # crops of 8-100% of the image at every position: no two samples alike, none the whole image resized
        assert len(torch.unique(inputs.flatten(1), dim=0)) == 28
