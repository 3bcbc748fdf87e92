"""Reading run folders back: what a run left (metrics.json, or failure.json when it failed, pruned.json when a search
pruned it) and the overrides Hydra recorded. The comparison, the search summary and the sweep summary all read runs
through here."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from finetune.run.failures import FAILURE_FILE

METRICS_FILE = "metrics.json"
PRUNED_FILE = "pruned.json"  # written by a trial that a search's pruner stopped


def read_json(path: Path) -> dict | None:
    """The file's object, None when there is no such file."""
    return json.loads(path.read_text()) if path.exists() else None


def metrics(run_dir: Path) -> dict | None:
    return read_json(Path(run_dir) / METRICS_FILE)


def failure(run_dir: Path) -> dict | None:
    return read_json(Path(run_dir) / FAILURE_FILE)


def pruned(run_dir: Path) -> dict | None:
    return read_json(Path(run_dir) / PRUNED_FILE)


def overrides(run_dir: Path) -> list[str]:
    """The job's task overrides as Hydra recorded them (.hydra/overrides.yaml)."""
    return yaml.safe_load((Path(run_dir) / ".hydra" / "overrides.yaml").read_text()) or []


def job_dirs(sweep_dir: Path, nested: bool = False) -> list[Path]:
    """Every job folder of a sweep (those Hydra wrote overrides into), in job order; `nested`: at any depth."""
    pattern = "**/.hydra/overrides.yaml" if nested else "*/.hydra/overrides.yaml"
    jobs = {p.parent.parent for p in Path(sweep_dir).glob(pattern)}
    return sorted(jobs, key=lambda p: (0, int(p.name), "") if p.name.isdigit() else (1, 0, str(p)))


def finished_or_failed(folder: Path) -> list[Path]:
    """Run folders under `folder` (or `folder` itself) that hold a metrics.json or a failure.json."""
    folder = Path(folder)
    return sorted({p.parent for name in (METRICS_FILE, FAILURE_FILE)
                   for p in [*folder.glob(f"*/{name}"), *folder.glob(name)]})
