"""Sweeps and searches (`finetune-train -m`): the summary at the end of every sweep (`sweep_summary`: the failed jobs,
or a search's best trial), the end of a search (`best`: best.json, the winning trial's folder and metrics), and the
trial's side of an Optuna study (`pruning`: the study's storage, reporting each validation, stopping a pruned trial).
The sweeper itself is a Hydra plugin: src/hydra_plugins/finetune_optuna_sweeper/."""
