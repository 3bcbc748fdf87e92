"""The strategy comparison report: a table (CSV, Markdown, terminal) and a figure, from runs' metrics.json files."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from finetune.config import FAILURE_FILE

COLUMNS = [  # (metrics.json key, column header, format)
    ("strategy", "strategy", "{}"),
    ("test_acc", "test acc", "{:.4f}"),
    ("val_acc", "val acc", "{:.4f}"),
    ("fit_seconds", "fit s", "{:.1f}"),
    ("train_samples_per_second", "train samples/s", "{:,.0f}"),
    ("peak_memory_mb", "peak memory MB", "{:,.0f}"),
    ("trainable_params", "trainable params", "{:,}"),
    ("trainable_percent", "trainable %", "{:.2f}"),
    ("feature_drift", "feature drift", "{:.4f}"),
    ("total_params", "total params", "{:,}"),
    ("extract_seconds", "extract s", "{:.1f}"),
    ("cache_hit", "cache hit", "{}"),
]
def collect_runs(folder: str | Path) -> list[dict]:
    """metrics.json of every run under `folder` (a compare output or a `finetune-train -m` multirun folder), and a
    row with `failed: true` and the error for every run that wrote failure.json instead.

    Rows go from the most trained parameters to the fewest, then from the longest fit to the shortest, failed runs
    last: the order follows from the runs themselves, so a new strategy needs no entry anywhere."""
    folder = Path(folder)
    rows = []
    for run_dir in sorted({p.parent for pattern in ("metrics.json", FAILURE_FILE)
                           for p in [*folder.glob(f"*/{pattern}"), *folder.glob(pattern)]}):
        if (run_dir / FAILURE_FILE).exists():
            failure = json.loads((run_dir / FAILURE_FILE).read_text())
            rows.append({"strategy": failure.get("strategy") or run_dir.name, "failed": True,
                         "error": failure.get("error", "?"), "run_dir": str(run_dir)})
            continue
        metrics = json.loads((run_dir / "metrics.json").read_text())
        metrics["run_dir"] = str(run_dir)
        rows.append(metrics)
    return sorted(rows, key=lambda m: (bool(m.get("failed")), -(m.get("trainable_params") or 0),
                                       -(m.get("fit_seconds") or 0), m.get("strategy", ""), m["run_dir"]))


def succeeded(rows: list[dict]) -> list[dict]:
    return [row for row in rows if not row.get("failed")]


def failure_lines(rows: list[dict]) -> list[str]:
    return [f"failed: {row['strategy']}: {row['error']} ({row['run_dir']})" for row in rows if row.get("failed")]


def _cell(row: dict, key: str, fmt: str) -> str:
    value = row.get(key)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-" if key not in ("extract_seconds", "cache_hit") or row.get("strategy") == "cached" else ""
    return fmt.format(value)


def table_rows(rows: list[dict]) -> list[list[str]]:
    return [[_cell(row, key, fmt) for key, _, fmt in COLUMNS] for row in rows]


def format_markdown(rows: list[dict]) -> str:
    headers = [header for _, header, _ in COLUMNS]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in table_rows(succeeded(rows))]
    failures = failure_lines(rows)
    return "\n".join(lines) + "\n" + ("\n" + "\n".join(f"- {line}" for line in failures) + "\n" if failures else "")


def format_text(rows: list[dict]) -> str:
    headers = [header for _, header, _ in COLUMNS]
    body = table_rows(succeeded(rows))
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(headers), line(["-" * w for w in widths]), *map(line, body), *failure_lines(rows)])


def validation_curve(run_dir: str | Path) -> list[tuple[float, float]]:
    """(seconds since fit start, val/acc) per validation, from the run's CSV log (RunMeter logs the time)."""
    points = []
    for log in sorted(Path(run_dir).glob("**/metrics.csv")):
        with open(log, newline="") as handle:
            for record in csv.DictReader(handle):
                if record.get("val/acc") and record.get("time/elapsed_seconds"):
                    points.append((float(record["time/elapsed_seconds"]), float(record["val/acc"])))
    return sorted(points)


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    names = [row["strategy"] for row in rows]
    # one distinct colour per strategy: tab10 holds ten, tab20 twenty
    palette = plt.cm.tab10 if len(rows) <= 10 else plt.cm.tab20
    colors = [palette(i % palette.N) for i in range(len(rows))]
    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(19, 5.4))
    for row, color in zip(rows, colors):
        total = row["fit_seconds"] + (row.get("extract_seconds") or 0.0)
        left.scatter(total, 100 * row["test_acc"], s=90, color=color, zorder=3, label=row["strategy"])
    left.set_xscale("log")
    left.xaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    left.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x:g}"))
    left.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    left.margins(x=0.15, y=0.2)
    left.set_xlabel("fit time, seconds (log; cached includes feature extraction)")
    left.set_ylabel("test accuracy, %")
    left.set_title("accuracy against training time")
    left.grid(True, which="both", alpha=0.3)
    for row, color in zip(rows, colors):
        curve = validation_curve(row["run_dir"]) if row.get("run_dir") else []
        if curve:
            middle.plot(*zip(*[(t, 100 * acc) for t, acc in curve]), marker=".", color=color, label=row["strategy"])
    middle.set_xlabel("wall time since fit start, seconds (log)")
    middle.set_xscale("log")
    middle.set_ylabel("validation accuracy, %")
    middle.set_title("validation accuracy during fit")
    middle.grid(True, which="both", alpha=0.3)
    right.barh(names, [row["peak_memory_mb"] for row in rows], color=colors)
    right.invert_yaxis()
    device = rows[0].get("device", "") if rows else ""
    right.set_xlabel("peak memory, MB " + ("(CUDA max allocated)" if device.startswith("cuda") else "(process RSS)"))
    right.set_title("peak memory (cached: incl. extraction)")
    for i, row in enumerate(rows):
        right.annotate(f" {row['peak_memory_mb']:,.0f}", (row["peak_memory_mb"], i), ha="left", va="center",
                       fontsize=8)
    right.margins(x=0.2)
    fig.suptitle(title)
    # one legend for all three panels, below them, so that it hides no point or curve
    handles, labels = left.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(rows), 8), fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0.1, 1, 1), w_pad=4)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(rows: list[dict], output_dir: str | Path, title: str = "strategy comparison") -> dict[str, Path]:
    """comparison.csv, comparison.md and comparison.png in `output_dir`; returns their paths."""
    if not succeeded(rows):
        raise ValueError(f"no runs with a metrics.json under {output_dir}")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = {kind: output_dir / f"comparison.{kind}" for kind in ("csv", "md", "png")}
    keys = [key for key, _, _ in COLUMNS] + sorted({k for r in rows for k in r} - {k for k, _, _ in COLUMNS})
    # a failed run is a row too, with `failed` and `error` and empty measurements
    with open(paths["csv"], "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=keys, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    first = succeeded(rows)[0]
    header = (f"# {title}\n\nbackbone `{first.get('backbone')}`, data `{first.get('data')}`, "
              f"{first.get('epochs')} epochs, device `{first.get('device')}`, precision `{first.get('precision')}`\n\n")
    paths["md"].write_text(header + format_markdown(rows))
    plot(succeeded(rows), paths["png"], f"{title}: {first.get('backbone')} on {first.get('data')}")
    return paths
