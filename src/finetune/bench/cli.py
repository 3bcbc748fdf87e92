"""finetune-bench: one command, a benchmark each (a script that prints a table and writes JSON; none asserts).

    finetune-bench [--device cuda ...]   training throughput and peak memory, template against a hand-written loop
    finetune-bench cache                 the feature cache as the dataset grows (finetune.bench.cache)
    finetune-bench loader                a JPEG folder: the PIL path against the decode-once store (finetune.bench.loader)
    finetune-bench storage               the store's library, chosen by measurement (finetune.bench.storage)
    finetune-bench head_grid             a grid of 1 to 64 heads on cached features, at two sizes (finetune.bench.head_grid)
"""

from __future__ import annotations

import importlib
import sys

SUBCOMMANDS = {"cache": "finetune.bench.cache", "loader": "finetune.bench.loader", "storage": "finetune.bench.storage",
               "head_grid": "finetune.bench.head_grid"}


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] and argv[0] in SUBCOMMANDS:  # imported on use: each benchmark pulls in what it measures
        importlib.import_module(SUBCOMMANDS[argv[0]]).main(argv[1:])
        return
    from finetune.bench.training import benchmark

    benchmark(argv)


if __name__ == "__main__":
    main()
