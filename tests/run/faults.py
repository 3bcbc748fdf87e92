"""Callbacks the fault tests select from the command line (`+callbacks.x._target_=tests.run.faults.X`)."""

from __future__ import annotations

import hashlib
import os
import signal
from pathlib import Path

import lightning as L
import torch

from finetune.callbacks import NonFiniteLossGuard


class KillAtStep(L.Callback):
    """SIGKILL this process when the given optimizer step is about to run: no cleanup, no final checkpoint."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class PoisonWeightsAtStep(L.Callback):
    """Fill the head's weights with NaN after the given optimizer step, so the next loss is NaN."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            with torch.no_grad():
                module.head[-1].weight.fill_(float("nan"))


class WriteWeightDigest(L.Callback):
    """After fit, every rank writes a digest of its weights to <output_dir>/weights_rank<r>.txt."""

    def __init__(self, output_dir: str):
        self.output_dir = output_dir

    def on_fit_end(self, trainer, module):
        Path(self.output_dir, f"weights_rank{trainer.global_rank}.txt").write_text(weights_digest(module))


class WriteSeed(L.Callback):
    """At fit start, every rank writes the seed it runs with (Lightning's PL_GLOBAL_SEED) to <output_dir>/seed_rank<r>.txt."""

    def __init__(self, output_dir: str):
        self.output_dir = output_dir

    def on_fit_start(self, trainer, module):
        import os

        Path(self.output_dir, f"seed_rank{trainer.global_rank}.txt").write_text(os.environ["PL_GLOBAL_SEED"])


class RecordDDPWrapping(L.Callback):
    """Writes whether the model was already wrapped in DDP at setup (where the module applies channels_last) and at
    fit start, to <output_dir>/wrapping_rank<r>.json."""

    def __init__(self, output_dir: str):
        self.output_dir, self.seen = output_dir, {}

    def _wrapped(self, trainer) -> bool:
        from torch.nn.parallel import DistributedDataParallel

        return isinstance(trainer.strategy.model, DistributedDataParallel)

    def setup(self, trainer, module, stage):
        self.seen["setup"] = self._wrapped(trainer)

    def on_fit_start(self, trainer, module):
        self.seen["fit_start"] = self._wrapped(trainer)
        import json

        Path(self.output_dir, f"wrapping_rank{trainer.global_rank}.json").write_text(json.dumps(self.seen))


class RecordLearningRates(L.Callback):
    """Appends, at every optimizer step, `{"step", "names", "lrs"}` as a JSON line to `path` (across resumed runs)."""

    def __init__(self, path: str):
        self.path = path

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        import json

        groups = trainer.optimizers[0].param_groups
        with open(self.path, "a") as handle:
            handle.write(json.dumps({"step": trainer.global_step, "names": [g.get("name") for g in groups],
                                     "lrs": [g["lr"] for g in groups]}) + "\n")


class WriteEpochWeightDigest(WriteWeightDigest):
    """Also after every training epoch (so after every phase): weights_rank<r>_epoch<e>.txt."""

    def on_train_epoch_end(self, trainer, module):
        Path(self.output_dir, f"weights_rank{trainer.global_rank}_epoch{trainer.current_epoch}.txt").write_text(
            weights_digest(module))


def weights_digest(module) -> str:
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class CopyCheckpointAtStep(L.Callback):
    """Copy last.ckpt to `copy_to` when the given optimizer step is about to run (the checkpoint a kill then would
    leave), so one uninterrupted run also yields a mid-run checkpoint to resume from."""

    def __init__(self, step: int, source: str, copy_to: str):
        self.step, self.source, self.copy_to = step, source, copy_to

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.global_step == self.step:
            import shutil

            shutil.copyfile(self.source, self.copy_to)


class RecordCacheReport(L.Callback):
    """At fit start, every rank writes what its feature cache datamodule did to <output_dir>/cache_rank<r>.json."""

    def __init__(self, output_dir: str):
        self.output_dir = output_dir

    def on_fit_start(self, trainer, module):
        import json

        report = getattr(trainer.datamodule, "report", {})
        Path(self.output_dir, f"cache_rank{trainer.global_rank}.json").write_text(json.dumps(report))


class RecordImageStore(L.Callback):
    """At fit start, every rank writes its image store's report (what it decoded) to <output_dir>/store_rank<r>.json."""

    def __init__(self, output_dir: str):
        self.output_dir = output_dir

    def on_fit_start(self, trainer, module):
        import json

        images = getattr(trainer.datamodule, "images", trainer.datamodule)
        report = images.store.report if getattr(images, "store", None) is not None else None
        Path(self.output_dir, f"store_rank{trainer.global_rank}.json").write_text(json.dumps(report))


def counting_torchvision(log: str, **kwargs):
    """data._target_ for tests: a TorchvisionDataModule whose prepare_data appends its rank to `log`."""
    from finetune.data.sources.torchvision import TorchvisionDataModule

    class CountingTorchvision(TorchvisionDataModule):
        def prepare_data(self):
            with open(log, "a") as handle:
                handle.write(f"{os.environ.get('LOCAL_RANK', '0')}\n")
            super().prepare_data()

    return CountingTorchvision(**kwargs)


class SwappedBatchNorm(torch.nn.BatchNorm2d):
    """What SyncBatchNorm is to the model: a new module in a BatchNorm's place, holding the same parameters."""


def swap_batchnorm(module: torch.nn.Module) -> torch.nn.Module:
    """Every BatchNorm2d replaced as torch.nn.SyncBatchNorm.convert_sync_batchnorm replaces it: a new module, the same
    Parameter objects, the buffers copied, the training flag carried over."""
    if isinstance(module, torch.nn.BatchNorm2d) and not isinstance(module, SwappedBatchNorm):
        swapped = SwappedBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                   module.track_running_stats)
        if module.affine:
            swapped.weight, swapped.bias = module.weight, module.bias
        swapped.running_mean, swapped.running_var = module.running_mean, module.running_var
        swapped.num_batches_tracked = module.num_batches_tracked
        swapped.training = module.training
        for name, child in module.named_children():  # as torch's conversion keeps them (timm's act, drop)
            swapped.add_module(name, swap_batchnorm(child))
        return swapped
    for name, child in module.named_children():
        module.add_module(name, swap_batchnorm(child))
    return module


class BatchNormSwappingStrategy(L.pytorch.strategies.SingleDeviceStrategy):
    """trainer.sync_batchnorm=true under DDP, in one CPU process: Lightning's DDP strategies apply their layer sync in
    setup(), after the LightningModule (and so the freezing strategy's prepare()) exists; this one swaps every
    BatchNorm there, and reports two processes so that the strategies take their DDP path (a staged one re-enters
    its first phase at train start); the data loaders then give it rank 0's half."""

    @property
    def world_size(self) -> int:
        return 2

    @world_size.setter
    def world_size(self, value: int) -> None:  # Lightning's base class assigns it
        pass

    def setup(self, trainer) -> None:
        self.model = swap_batchnorm(self.model)
        super().setup(trainer)


class RecordBatchNormModes(L.Callback):
    """At every training step: [epoch, the backbone's (swapped) BatchNorm modules in train mode]; written at each
    epoch's end to <output_dir>/bn_training.json."""

    def __init__(self, output_dir: str):
        self.output_dir, self.training = output_dir, []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        swapped = {n: m.training for n, m in module.named_modules() if isinstance(m, SwappedBatchNorm)}
        assert swapped, "the BatchNorm modules were swapped"
        self.training.append([trainer.current_epoch,
                              sorted(n for n, training in swapped.items() if training and n.startswith("backbone."))])

    def on_train_epoch_end(self, trainer, module):
        import json

        Path(self.output_dir, "bn_training.json").write_text(json.dumps(self.training))


class GuardSeeingNaNOnRank1(NonFiniteLossGuard):
    """The real guard, shown a NaN loss on rank 1 only from optimizer step `step` on (the gradients stay finite, so
    rank 0's own loss never turns): what a rank-local overflow looks like to the guard."""

    def __init__(self, step: int, check_every_n_steps: int = 10):
        super().__init__(check_every_n_steps)
        self.step = step

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if trainer.global_rank == 1 and trainer.global_step >= self.step:
            outputs = {"loss": torch.full((), float("nan"), device=module.device)}
        super().on_train_batch_end(trainer, module, outputs, batch, batch_idx)


def cached_two_ranks_per_folder(cache_dir: str, **kwargs):
    """strategy._target_ for tests: strategy=cached with the cache folder `<cache_dir>/node<LOCAL_RANK // 2>`, so four
    ranks on one machine stand for two nodes of two ranks, each node with its own local folder."""
    from finetune.strategies import CachedFeatures

    return CachedFeatures(cache_dir=f"{cache_dir}/node{int(os.environ.get('LOCAL_RANK', '0')) // 2}", **kwargs)
