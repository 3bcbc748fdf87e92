"""The LightningModule: a pretrained backbone, a head, and the freezing strategy that decides what trains."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from lightning import LightningModule
from torch import nn
from torchmetrics import CatMetric, MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from finetune.backbones import Backbone
from finetune.errors import ConfigError
from finetune.run.lightning_internals import attached_trainer, should_update_logs
from finetune.run.resume import check_resume, processes
from finetune.optim import constant, param_groups, phased_schedule
from finetune.run.rng import rng_states, set_rng_states
from finetune.strategies import FreezingStrategy


STAGES = ("train", "val", "test")


class FinetuneModule(LightningModule):
    def __init__(self, backbone: Backbone, head: Callable[..., nn.Module], strategy: FreezingStrategy,
                 num_classes: int, optimizer: Callable[..., torch.optim.Optimizer] | None = None,
                 scheduler: Callable[[int, int], float] | None = None, channels_last: bool = True,
                 compile: bool = False, run_config: dict | None = None, layer_decay: float | None = None,
                 lr_mult: dict[str, float] | None = None, class_names: list[str] | None = None,
                 preprocessing: dict | None = None):
        super().__init__()
        # the whole resolved run config, so every logger (CSV hparams.yaml, TensorBoard's HPARAMS, MLflow params) can
        # tell runs apart by strategy, lr, backbone ...; Lightning logs these once, at fit start
        self.save_hyperparameters({**(run_config or {}), "num_classes": num_classes, "channels_last": channels_last,
                                   "compile": compile})
        self.backbone = backbone.model
        self.backbone_name = backbone.name
        self.backbone_is_conv = backbone.is_conv
        self.head = head(in_features=backbone.num_features, num_classes=num_classes)
        self.strategy = strategy
        self.optimizer_factory = optimizer or (lambda params: torch.optim.AdamW(params, lr=1e-3))
        self.schedule_shape = scheduler or constant  # lr factor at (step in segment, segment length)
        self.layer_decay, self.lr_mult = layer_decay, dict(lr_mult or {})
        self.run_config = run_config
        # what a prediction needs besides the weights, written into every checkpoint (finetune.load_model reads it)
        self.class_names = list(class_names) if class_names is not None else [str(c) for c in range(num_classes)]
        if len(self.class_names) != num_classes:
            raise ConfigError(f"{len(self.class_names)} class names for {num_classes} classes")
        self.preprocessing = preprocessing
        self.criterion = nn.CrossEntropyLoss()
        # Per-stage metrics accumulate on the device every step and are logged once an epoch: Lightning's self.log
        # costs milliseconds of Python per call, which a frozen backbone's step cannot hide. validate_args=False: the
        # argument checks synchronise with the GPU. Keys get a "_" because "train" is an nn.Module method.
        self.accuracy = nn.ModuleDict({f"{stage}_": MulticlassAccuracy(num_classes, average="micro", validate_args=False)
                                       for stage in STAGES})
        # nan_strategy="disable": the default NaN check reads the value back every step (NonFiniteLossGuard watches)
        self.mean_loss = nn.ModuleDict({f"{stage}_": MeanMetric(nan_strategy="disable") for stage in STAGES})
        # the test split per sample (index, label, predicted class, probability of the label), gathered from every
        # rank: what finetune-compare pairs runs on (predictions.csv beside metrics.json)
        self.test_predictions = CatMetric(nan_strategy="disable").set_dtype(torch.float64)
        self.best_val: dict[str, float] = {}  # kept in checkpoints: a resumed run knows its earlier best
        strategy.prepare(self)

    # -- modes ---------------------------------------------------------------------------------------------------
    def train(self, mode: bool = True) -> FinetuneModule:
        """Lightning calls train() every epoch and after every validation loop: frozen parts go back to eval."""
        super().train(mode)
        if mode and hasattr(self, "strategy"):
            self.strategy.restore_eval_modes(self)
        return self

    def setup(self, stage: str) -> None:
        """Runs before the strategy moves the model and wraps it in DDP, whose gradient buckets follow the parameters'
        strides as they are then: channels_last must come first (after wrapping, every step would copy gradients)."""
        trainer = attached_trainer(self)
        device = trainer.strategy.root_device if trainer is not None else self.device
        if stage == "fit" and trainer is not None:
            self.strategy.before_wrap(self, trainer)
        if device.type == "cuda" and self.hparams.channels_last and self.backbone_is_conv:
            self.backbone.to(memory_format=torch.channels_last)
        if self.hparams.compile and not getattr(self, "_compiled", False):
            self.backbone.compile()  # in place: state_dict keys keep their names (no `_orig_mod.`)
            self._compiled = True

    # -- steps ---------------------------------------------------------------------------------------------------
    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.head(self.strategy.extract(self.backbone, inputs))

    def _step(self, batch, stage: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, logits) of a batch, accumulated into the stage's epoch metrics."""
        inputs, targets = batch
        logits = self(inputs)
        loss = self.criterion(logits, targets)
        self.accuracy[f"{stage}_"].update(logits.detach(), targets)
        # weighted by samples: the batch mean once per sample, so a last batch of 14 weighs 14/256 of a full one
        self.mean_loss[f"{stage}_"].update(loss.detach().expand(len(targets)))
        return loss, logits

    def _log_epoch(self, stage: str) -> dict[str, torch.Tensor]:
        """Epoch metrics, synchronised across DDP ranks by torchmetrics' compute(); returns what it logged."""
        accuracy, mean_loss = self.accuracy[f"{stage}_"], self.mean_loss[f"{stage}_"]
        if not accuracy.update_called:
            return {}
        logged = {"acc": accuracy.compute(), "loss": mean_loss.compute()}
        self.log_dict({f"{stage}/{name}": value for name, value in logged.items()}, prog_bar=stage != "test")
        accuracy.reset()
        mean_loss.reset()
        return logged

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        loss, _ = self._step(batch, "train")
        # only on the steps Lightning writes to the loggers (each self.log costs milliseconds of Python), so the value
        # written at step s is step s's own loss; the rule is Lightning's (pinned by tests/callbacks/test_metrics.py)
        if should_update_logs(self.trainer):
            self.log("train/loss_step", loss.detach(), prog_bar=True, batch_size=len(batch[-1]))
        return loss

    def on_train_start(self) -> None:
        """Also here: a run resumed mid-epoch gets no on_train_epoch_start for that epoch (pinned by
        tests/strategies/test_staged.py's kill mid-phase-2)."""
        self.on_train_epoch_start()

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        """A resumed run continues the random streams (dropout) from the checkpoint at its first step: with in-memory
        data nothing draws from them between a checkpoint and the next step, so the resumed steps are the same."""
        if getattr(self, "_rng_to_restore", None) is not None:
            set_rng_states(self._rng_to_restore)
            self._rng_to_restore = None

    def on_train_epoch_start(self) -> None:
        """Enter the phase of this epoch: which parts train, and their modes."""
        self.strategy.enter_phase(self, self.strategy.phase_at(self.current_epoch))

    def on_train_epoch_end(self) -> None:
        self._log_epoch("train")

    def on_validation_epoch_end(self) -> None:
        logged = self._log_epoch("val")
        if logged and not self.trainer.sanity_checking:
            # the best of the logged val/acc and val/loss (on every rank: compute() synchronised them), whatever the
            # checkpoint callback monitors: metrics.json's best_val_acc and best_val_loss
            self.best_val = {"acc": max(self.best_val.get("acc", -math.inf), float(logged["acc"])),
                             "loss": min(self.best_val.get("loss", math.inf), float(logged["loss"]))}

    def on_test_epoch_start(self) -> None:
        self.test_predictions.reset()
        self._test_seen = 0

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test")

    def test_prediction_rows(self) -> torch.Tensor:
        """float64 [N, 4] (index, label, predicted, probability of the label) of the last test, every rank's, by
        index."""
        rows = self.test_predictions.compute().view(-1, 4).cpu()
        return rows[rows[:, 0].argsort()]

    def validation_step(self, batch, batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch, batch_idx: int) -> None:
        _, logits = self._step(batch, "test")
        targets = batch[-1]
        # evaluation reads the split in order, each rank every world-th sample (eval_sampler): the k-th sample this
        # rank sees is index rank + k * world
        world, rank = self.trainer.world_size, self.trainer.global_rank
        index = rank + world * (self._test_seen + torch.arange(len(targets), device=targets.device))
        self._test_seen += len(targets)
        probabilities = logits.detach().float().softmax(dim=-1)
        self.test_predictions.update(torch.stack([index.double(), targets.double(), probabilities.argmax(-1).double(),
                                                  probabilities.gather(1, targets[:, None])[:, 0].double()], dim=1))

    def predict_step(self, batch, batch_idx: int) -> torch.Tensor:
        return self(batch[0] if isinstance(batch, (tuple, list)) else batch).softmax(dim=-1)

    # -- optimization --------------------------------------------------------------------------------------------
    def configure_optimizers(self):
        named = self.strategy.trainable_parameters(self)
        if not named:
            raise ConfigError(f"strategy {self.strategy.name!r} left no trainable parameter")
        settings = getattr(self.optimizer_factory, "keywords", {})
        lr, weight_decay = float(settings.get("lr", 1e-3)), float(settings.get("weight_decay", 0.0))
        phases = self.strategy.phases()
        groups, group_phase_mults = param_groups(self, named, lr, weight_decay, self.layer_decay, self.lr_mult,
                                                 [phase.lr_mult for phase in phases])
        optimizer = self.optimizer_factory(groups)
        trainer = self.trainer
        total_steps = trainer.estimated_stepping_batches
        batches = trainer.num_training_batches
        if not math.isfinite(batches) and len(phases) > 1:
            raise ConfigError(f"strategy {self.strategy.name!r} has phases measured in epochs, but the train loader "
                              f"has no length; give it a __len__")
        steps_per_epoch = math.ceil(batches / trainer.accumulate_grad_batches) if math.isfinite(batches) else 0
        starts = [epoch * steps_per_epoch for epoch in self.strategy.phase_start_epochs()]
        if not math.isfinite(total_steps):  # max_epochs=-1 and no max_steps: segments end with their phase
            epochs = self.strategy.phase_start_epochs()[-1] + (phases[-1].epochs or 0)
            total_steps = max(epochs, 1) * steps_per_epoch
        scheduler = phased_schedule(optimizer, int(total_steps), self.schedule_shape, starts,
                                    [float(p.lr) / lr if p.lr is not None else 1.0 for p in phases],
                                    [p.schedule == "restart" for p in phases], group_phase_mults)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "name": "lr"}}

    # -- checkpoints ---------------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["finetune"] = {"strategy": self.strategy.name, "config": self.run_config,
                                  "class_names": self.class_names, "preprocessing": self.preprocessing,
                                  "rng": rng_states(), "best_val": self.best_val,
                                  "processes": processes(trainer) if (trainer := attached_trainer(self)) else None}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # taken up just before the first resumed step (on_train_batch_start), where the uninterrupted run was
        self._rng_to_restore = checkpoint.get("finetune", {}).get("rng")
        self.best_val = dict(checkpoint.get("finetune", {}).get("best_val") or {})
        saved = checkpoint.get("finetune", {}).get("strategy")
        if saved is not None and saved != self.strategy.name:
            raise ConfigError(f"checkpoint was trained with strategy={saved}, this run uses "
                              f"strategy={self.strategy.name}; resume with strategy={saved}, or start a new run "
                              f"from its weights instead of resuming")
        trainer = attached_trainer(self)
        if trainer is None or trainer.state.fn == "fit":  # resuming, or loading outside a trainer
            check_resume(checkpoint.get("finetune", {}), self.run_config, trainer)
