"""Benchmarks: scripts that time and measure, print a table and write JSON, and assert nothing.

`cli` (finetune-bench) dispatches to `training` (throughput and memory per strategy), `cache` (the feature cache at
two sizes), `loader` (image files: PIL against the store), `storage` (the store's library) and `head_grid`
(a grid of heads on cached features); `report` writes them.
"""
