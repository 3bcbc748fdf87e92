"""Sweeps and searches (`finetune-train -m`): the summary at the end of every sweep (`sweep_summary`: the failed jobs,
or a search's best trial) and the end of a search (`best`: best.json, the winning trial's folder and metrics)."""
