"""lp_ft: linear probe, then fine-tune (Kumar et al., ICLR 2022). Phase `probe` trains the head alone on features
from the feature cache (seconds; a cache hit on the next run); phase `finetune` then trains the backbone (all of it, or
all but `modules`) together with the probed head, at its own, smaller lr. Starting from a fitted head, the backbone's
features move less than when a random head's gradients hit them (`feature_drift` in metrics.json measures it)."""

from __future__ import annotations

from finetune.strategies.gradual import GradualUnfreezing


class LinearProbeThenFinetune(GradualUnfreezing):
    # finetune-compare's tuning: the probe's lr with the head grid on the cached features (probe_epochs epochs),
    # then the rest of its search_space with Optuna, the probe fixed
    head_grid_keys = {"strategy.probe_lr": "lr"}
    head_grid_epochs_key = "strategy.probe_epochs"

    @staticmethod
    def head_grid_applies(strategy_cfg) -> bool:
        """The grid trains on cached features: a probe on images (probe_on=images) tunes with Optuna instead."""
        return strategy_cfg.get("probe_on", "cached") == "cached"

    def __init__(self, probe_epochs: int = 10, probe_lr: float = 1e-2, finetune_lr: float = 1e-4,
                 modules: list[str] | None = None, train_bn: bool = False, freeze_bn_stats: bool = False,
                 probe_on: str = "cached",
                 finetune_schedule: str = "restart", **cache):
        phases = [{"name": "probe", "epochs": probe_epochs, "train": ["head"], "lr": probe_lr, "inputs": probe_on},
                  {"name": "finetune", "epochs": None, "train": ["all"], "lr": finetune_lr,
                   "schedule": finetune_schedule}]
        super().__init__(phases, train_bn=train_bn, keep_frozen=modules, name="lp_ft",
                         freeze_bn_stats=freeze_bn_stats, **cache)
