"""The one report writer of the benchmarks: each writes its JSON the same way and removes its scratch folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path


def write_report(report: dict, out: str, work_dir: Path | None = None) -> dict:
    """Write a benchmark's JSON report (and remove its scratch folder); returns the report."""
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(report, indent=1))
    print(f"written: {out}")
    if work_dir is not None:
        shutil.rmtree(work_dir, ignore_errors=True)
    return report
