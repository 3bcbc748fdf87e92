"""The one report writer of the benchmarks: each prints its table and writes its JSON the same way and removes its
scratch folder."""

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


def text_table(headers: list[str], body: list[list[str]]) -> str:
    """A plain-text table: a header line, a rule, one line per row, columns padded to their widest cell."""
    widths = [max(len(h), *(len(row[i]) for row in body)) for i, h in enumerate(headers)]
    line = lambda cells: " | ".join(c.ljust(w) for c, w in zip(cells, widths))
    return "\n".join([line(headers), "-+-".join("-" * w for w in widths), *map(line, body)])
