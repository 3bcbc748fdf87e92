"""Building a store entry's missing shards with every rank of a job (the feature cache's and the image store's).

Each rank says which shards its folder holds and which folder that is: a random number written once in the folder
(`.folder-token`), so ranks that read the same number share the folder, on one node or across nodes on a shared file
system, and ranks on different nodes' local disks do not, whatever their paths. Then:

1. the shards no rank holds are dealt out across every rank of the job;
2. what each folder still lacks (a node-local folder: what the other nodes wrote) is dealt out among the ranks that
   share that folder, the least loaded first.

So each folder gets each missing shard once, every rank works at the same time, and the one barrier after the build
waits for at most about one shard of the slowest rank. Shards are written atomically (`shard_store`), so a killed
build resumes from the shards it wrote.
"""

from __future__ import annotations

import logging
import os
import secrets
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from finetune.data.storage.shard_store import Entry, StoreWriteError

log = logging.getLogger(__name__)
FOLDER_TOKEN = ".folder-token"


def folder_token(root: Path) -> int:
    """The random 62-bit number stored in `root`, written by the first process that asks (atomically: a link that
    fails when another process linked first), so every process that sees this folder reads the same one."""
    path = root / FOLDER_TOKEN
    if not path.exists():
        root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=root, prefix=f"{FOLDER_TOKEN}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as handle:
                handle.write(f"{secrets.randbits(62)}\n")
                handle.flush()
                os.fsync(handle.fileno())
            os.link(tmp, path)
        except FileExistsError:
            pass
        finally:
            Path(tmp).unlink(missing_ok=True)
    return int(path.read_text())


def deal_shards(num_shards: int, held: list[set[int]], folders: list[int]) -> list[list[int]]:
    """Each rank's shards to build, given the shards each rank's folder holds and each rank's folder token."""
    world = len(held)
    nobody = [s for s in range(num_shards) if not any(s in h for h in held)]
    assigned = [nobody[rank::world] for rank in range(world)]
    for folder in dict.fromkeys(folders):
        sharers = [rank for rank in range(world) if folders[rank] == folder]
        present = set().union(*(held[rank] | set(assigned[rank]) for rank in sharers))
        for shard in (s for s in range(num_shards) if s not in present):
            assigned[min(sharers, key=lambda rank: (len(assigned[rank]), rank))].append(shard)
    return assigned


def build_across_ranks(entry: Entry, valid: list[int], strategy, build: Callable[[list[int]], None]) -> list[int]:
    """Under DDP: gather what each rank's folder holds (`valid`) and which folder it is, build this rank's deal, and
    wait for every rank at one barrier. `strategy` is Lightning's (all_gather, barrier, world_size, global_rank,
    root_device). Returns the shards this rank built; the caller then calls `finish_entry`."""
    world, rank = strategy.world_size, strategy.global_rank
    report = torch.zeros(entry.num_shards + 1, dtype=torch.int64)
    report[0] = folder_token(entry.folder.parent)
    report[1 + torch.tensor(valid, dtype=torch.long)] = 1
    gathered = strategy.all_gather(report.to(strategy.root_device)).reshape(world, -1).cpu()
    held = [set((row[1:] == 1).nonzero().flatten().tolist()) for row in gathered]
    plan = deal_shards(entry.num_shards, held, gathered[:, 0].tolist())
    if rank == 0 and any(plan):
        sharing = len(set(gathered[:, 0].tolist()))
        log.info("building %d shards of %s across %d ranks (%d folder(s)); each rank builds %s",
                 sum(map(len, plan)), entry.folder.name, world, sharing, "/".join(str(len(p)) for p in plan))
    build(plan[rank])
    strategy.barrier(f"shards_of_{entry.key}")
    return plan[rank]


def finish_entry(entry: Entry, build: Callable[[list[int]], None]) -> None:
    """Call with the entry's lock held, after its shards are built: write the complete manifest. A shard that went
    missing meanwhile (dropped as damaged by another process, removed by `finetune-cache clear`) is built again here;
    if the entry still lacks shards after that, a one-line error says so."""
    if entry.finish():
        return
    missing = entry.missing_shards()
    log.warning("store entry %s lacks shards %s after its build (removed by another process meanwhile); building them "
                "again", entry.key, missing)
    build(missing)
    if not entry.finish():
        raise StoreWriteError(f"store entry {entry.folder} still lacks shards {entry.missing_shards()} right after "
                              f"building them: another process is removing them (`finetune-cache clear`, or a run "
                              f"that finds them damaged); run again once it is done")
