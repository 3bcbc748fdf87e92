"""The strategy comparison report: a table (CSV, Markdown, terminal) and a figure, from runs' metrics.json files."""

from __future__ import annotations

import csv
import math
from pathlib import Path

from finetune.compare.decide import BEST_VAL, DEFAULT_MARGIN_POINTS, decide
from finetune.compare.tune import extraction_seconds, shown, tuning_seconds
from finetune.run import folders

COLUMNS = [  # (key of a strategy's row: metrics.json's, averaged over seeds, or decide's; column header, format)
    ("strategy", "strategy", "{}"),
    ("test_acc", "test acc", "{:.4f}"),
    ("test_acc_interval", "95% interval", "{}"),
    ("seed_sd_points", "seed sd (points)", "{:.2f}"),
    ("difference", "difference to reference (points, 95%)", "{}"),
    ("verdict", "verdict", "{}"),
    ("detectable_points", "detectable (points)", "{:.1f}"),
    ("seeds", "seeds", "{}"),
    ("splits", "splits", "{}"),
    ("cost_seconds", "cost s (fit + extraction)", "{:.1f}"),
    ("tuning_seconds", "tuning s", "{:.1f}"),
    ("cost_with_tuning_seconds", "cost s with tuning", "{:.1f}"),
    ("tuned", "tuned configuration", "{}"),
    ("best_val_acc", "best val acc", "{:.4f}"),
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
    for run_dir in folders.finished_or_failed(folder):
        failure = folders.failure(run_dir)
        if failure is not None:
            rows.append({"strategy": failure.get("strategy") or run_dir.name, "failed": True,
                         "error": failure.get("error", "?"), "run_dir": str(run_dir)})
            continue
        metrics = folders.metrics(run_dir)
        metrics["run_dir"] = str(run_dir)
        if "val_acc" in metrics and "best_val_acc" not in metrics:  # written before 2026-11-30, monitoring val/acc
            metrics["best_val_acc"] = metrics.pop("val_acc")
        rows.append(metrics)
    return sorted(rows, key=lambda m: (bool(m.get("failed")), -(m.get("trainable_params") or 0),
                                       -(m.get("fit_seconds") or 0), m.get("strategy", ""), m["run_dir"]))


def by_strategy(rows: list[dict], decision: dict | None = None) -> list[dict]:
    """One row per strategy, in the runs' order: numbers averaged over its seeds' runs, the rest from its first run,
    and decide()'s intervals and verdict."""
    groups: dict[str, list[dict]] = {}
    for row in succeeded(rows):
        groups.setdefault(row["strategy"], []).append(row)
    stats = (decision or {}).get("strategies", {})
    merged = []
    for strategy, runs in groups.items():
        row = dict(runs[0])
        for key in {k for run in runs for k in run}:
            values = [run.get(key) for run in runs]
            if len(set(map(str, values))) > 1 and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                      for v in values):
                mean = sum(values) / len(values)
                row[key] = round(mean, 6) if isinstance(mean, float) else mean
        row.update(seeds=len(runs), run_dirs=";".join(run["run_dir"] for run in runs),
                   seed_list=",".join(str(run.get("seed")) for run in runs))
        if strategy in stats:
            s = stats[strategy]
            row.update(test_acc=round(s["test_acc_mean"], 6), ci_low=round(s["ci_low"], 6),
                       ci_high=round(s["ci_high"], 6), test_acc_interval=f"[{s['ci_low']:.3f}, {s['ci_high']:.3f}]",
                       seed_sd_points=100 * s["seed_sd"], verdict=s["verdict"], splits=s["splits"],
                       seeds=s["seeds"], cost_seconds=s["fit_cost_seconds"])
            if (decision or {}).get("tuned"):
                row.update(tuning_seconds=s["tuning_seconds"], cost_with_tuning_seconds=s["cost_seconds"])
            if "diff_low" in s:
                row.update(diff_points=round(100 * s["diff"], 4), diff_low_points=round(100 * s["diff_low"], 4),
                           diff_high_points=round(100 * s["diff_high"], 4), detectable_points=100 * s["detectable"],
                           diff_seed_sd_points=100 * s["diff_seed_sd"],
                           difference=f"{100 * s['diff']:+.1f} [{100 * s['diff_low']:+.1f}, "
                                      f"{100 * s['diff_high']:+.1f}]")
        merged.append(row)
    return merged


def succeeded(rows: list[dict]) -> list[dict]:
    return [row for row in rows if not row.get("failed")]


def failure_lines(rows: list[dict]) -> list[str]:
    return [f"failed: {row['strategy']}: {row['error']} ({row['run_dir']})" for row in rows if row.get("failed")]


def _cell(row: dict, key: str, fmt: str) -> str:
    value = row.get(key)
    if key == "difference" and row.get("verdict") == "reference":
        return "reference"
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-" if key not in ("extract_seconds", "cache_hit") or row.get("strategy") == "cached" else ""
    return fmt.format(value)


def summarise(rows: list[dict], alpha: float = 0.05, margin_points: float = DEFAULT_MARGIN_POINTS,
              reference: str = BEST_VAL, tunings: dict[str, dict] | None = None) -> dict:
    """The report's content: one row per strategy (means over seeds, intervals, verdict, tuning), the decision
    (reference, recommendation lines), the failed runs and each strategy's tuning (tune.py's tuning.json)."""
    tunings = tunings or {}
    seconds = {strategy: tuning_seconds(record) for strategy, record in tunings.items()} if tunings else None
    decision = decide(succeeded(rows), margin_points, reference, alpha, seconds, extraction_seconds(tunings))
    strategies = by_strategy(rows, decision)
    for row in strategies:
        record = tunings.get(row["strategy"])
        if record is not None:
            row["tuned"] = shown(record.get("chosen") or {}) or "untuned"
    return {"strategies": strategies, "decision": decision, "failures": failure_lines(rows), "runs": rows,
            "tunings": tunings}


def table_rows(strategies: list[dict]) -> list[list[str]]:
    return [[_cell(row, key, fmt) for key, _, fmt in COLUMNS] for row in strategies]


def format_markdown(summary: dict) -> str:
    headers = [header for _, header, _ in COLUMNS]
    lines = [f"**{line}**" for line in summary["decision"]["lines"]] + [""]
    lines += ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in table_rows(summary["strategies"])]
    failures = summary["failures"]
    return ("\n".join(lines) + "\n" + ("\n" + "\n".join(f"- {line}" for line in failures) + "\n" if failures else "")
            + tuning_markdown(summary.get("tunings") or {}))


def tuning_markdown(tunings: dict[str, dict]) -> str:
    """The report's tuning section: per strategy how it was tuned, what was chosen, what it cost."""
    if not tunings:
        return ""
    first = next((r for r in tunings.values() if "seed" in r), next(iter(tunings.values())))
    cap = f", within {first['max_minutes']:g} minutes each" if first.get("max_minutes") else ""
    lines = ["", "## Tuning (on val; the test split untouched until the runs above)", "",
             (f"Every strategy with a search_space had {first['trials_budget']} trials{cap} at seed "
              f"{first.get('seed')} (not a test seed), the configured values first; a head-only search (head_grid) "
              f"tries its {first['trials_budget']} heads in one pass, lp_ft's probe grid comes before its Optuna "
              f"trials. The best val accuracy's configuration ran the seeded test runs. Figure: tuning.png."), "",
             ("| strategy | method | trials run | pruned | failed | best val acc | chosen | tuning wall s | "
              "tuning training s |"), "|---|---|---|---|---|---|---|---|---|"]
    for name, r in [(f"{s} (split {one.get('split_seed')})" if "per_split" in record else s, one)
                    for s, record in tunings.items() for one in record.get("per_split", [record])]:
        best = "-" if r.get("best_val_acc") is None else f"{r['best_val_acc']:.4f}"
        chosen = f"`{shown(r['chosen'])}`" if r.get("chosen") else r.get("reason", "untuned (no search_space)")
        if r.get("timed_out"):
            chosen += " (stopped by compare.tune.max_minutes)"
        if r.get("pinned"):
            chosen += f"; set by you: {shown(r['pinned'])}"
        lines.append(f"| {name} | {r['method']} | {r['run']} | {r['pruned']} | {r['failed']} | {best} | "
                     f"{chosen} | {r['wall_seconds']:.1f} | {r['device_seconds']:.1f} |")
    return "\n".join(lines) + "\n"


def plot_tuning(tunings: dict[str, dict], path: Path) -> None:
    """A small panel per tuned strategy: each trial's val accuracy (its best epoch; a pruned trial's last reported
    epoch, hollow), the chosen one ringed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tuned = {s: r for s, r in tunings.items() if r.get("trials")}
    if not tuned:
        return
    columns = min(len(tuned), 4)
    rows = math.ceil(len(tuned) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.6 * columns, 2.8 * rows), squeeze=False)
    for axis, (strategy, record) in zip(axes.flat, tuned.items()):
        trials = [t for t in record["trials"] if t.get("val_acc") is not None]
        for state, style in (("COMPLETE", {"color": "tab:blue"}),
                             ("PRUNED", {"facecolors": "none", "edgecolors": "tab:gray"})):
            picked = [t for t in trials if t["state"] == state]
            axis.scatter([t["number"] for t in picked], [100 * t["val_acc"] for t in picked], s=18,
                         label=state.lower(), **style)
        complete = [t for t in trials if t["state"] == "COMPLETE"]
        if complete:
            best = max(complete, key=lambda t: (t["val_acc"], -t["number"]))
            axis.scatter([best["number"]], [100 * best["val_acc"]], s=90, facecolors="none", edgecolors="tab:red",
                         label="chosen")
        axis.set_title(f"{strategy} ({record['method']})", fontsize=9)
        axis.set_xlabel("trial", fontsize=8)
        axis.set_ylabel("val acc, %", fontsize=8)
        axis.grid(True, alpha=0.3)
        axis.tick_params(labelsize=7)
    for axis in list(axes.flat)[len(tuned):]:
        axis.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def format_text(summary: dict) -> str:
    headers = [header for _, header, _ in COLUMNS]
    body = table_rows(summary["strategies"])
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([*summary["decision"]["lines"], "", line(headers), line(["-" * w for w in widths]),
                      *map(line, body), *summary["failures"]])


def validation_curve(run_dir: str | Path) -> list[tuple[float, float]]:
    """(seconds since fit start, val/acc) per validation, from the run's CSV log (RunMeter logs the time)."""
    points = []
    for log in sorted(Path(run_dir).glob("**/metrics.csv")):
        with open(log, newline="") as handle:
            for record in csv.DictReader(handle):
                if record.get("val/acc") and record.get("time/elapsed_seconds"):
                    points.append((float(record["time/elapsed_seconds"]), float(record["val/acc"])))
    return sorted(points)


def seed_curves(strategy_row: dict) -> tuple[list[float], list[float], list[float], list[float]] | None:
    """(time, mean, min, max) of val accuracy per validation over the strategy's seeds (time: the mean)."""
    curves = [validation_curve(run_dir) for run_dir in strategy_row.get("run_dirs", "").split(";") if run_dir]
    curves = [c for c in curves if c]
    if not curves:
        return None
    length = min(len(c) for c in curves)
    times = [sum(c[i][0] for c in curves) / len(curves) for i in range(length)]
    values = [[100 * c[i][1] for c in curves] for i in range(length)]
    return times, [sum(v) / len(v) for v in values], [min(v) for v in values], [max(v) for v in values]


def plot(summary: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    rows, decision = summary["strategies"], summary["decision"]
    names = [row["strategy"] for row in rows]
    # one distinct colour per strategy: tab10 holds ten, tab20 twenty
    palette = plt.cm.tab10 if len(rows) <= 10 else plt.cm.tab20
    colors = [palette(i % palette.N) for i in range(len(rows))]
    fig, ((left, middle), (memory, classes)) = plt.subplots(2, 2, figsize=(16, 10.5))
    for row, color in zip(rows, colors):
        total = row.get("cost_seconds", row["fit_seconds"])
        accuracy = 100 * row["test_acc"]
        error = None
        if "ci_low" in row:  # the 95% interval (over seeds, splits and test samples)
            error = [[accuracy - 100 * row["ci_low"]], [100 * row["ci_high"] - accuracy]]
        left.errorbar(total, accuracy, yerr=error, fmt="o", markersize=8, capsize=4, color=color, zorder=3,
                      label=row["strategy"])
    left.set_xscale("log")
    left.xaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    left.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x:g}"))
    left.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    left.margins(x=0.15, y=0.2)
    left.set_xlabel("cost: fit time, seconds (log; one feature extraction charged to each cache reader; mean)")
    left.set_ylabel("test accuracy, % (mean over seeds, 95% interval)")
    left.set_title("accuracy against training time")
    left.grid(True, which="both", alpha=0.3)
    for row, color in zip(rows, colors):
        curve = seed_curves(row)
        if curve:
            times, mean, low, high = curve
            middle.plot(times, mean, marker=".", color=color, label=row["strategy"])
            if row.get("seeds", 1) > 1:
                middle.fill_between(times, low, high, color=color, alpha=0.15, linewidth=0)
    middle.set_xlabel("wall time since fit start, seconds (log)")
    middle.set_xscale("log")
    middle.set_ylabel("validation accuracy, % (mean; band: min-max over seeds)")
    middle.set_title("validation accuracy during fit")
    middle.grid(True, which="both", alpha=0.3)
    memory.barh(names, [row["peak_memory_mb"] for row in rows], color=colors)
    memory.invert_yaxis()
    device = rows[0].get("device", "") if rows else ""
    memory.set_xlabel("peak memory, MB " + ("(CUDA max allocated)" if device.startswith("cuda") else "(process RSS)"))
    memory.set_title("peak memory (cached: incl. extraction)")
    for i, row in enumerate(rows):
        memory.annotate(f" {row['peak_memory_mb']:,.0f}", (row["peak_memory_mb"], i), ha="left", va="center",
                        fontsize=8)
    memory.margins(x=0.2)
    roles: dict[str, list[str]] = {}
    for role, strategy in (("reference", decision.get("best")), ("recommended by fit time", decision.get("by_time")),
                           ("recommended by parameters", decision.get("by_params"))):
        if strategy:
            roles.setdefault(strategy, []).append(role)
    per_class = decision.get("per_class", {})
    width = 0.8 / max(len(roles), 1)
    lowest = 100.0
    for k, (strategy, said) in enumerate(roles.items()):
        accuracy = per_class.get(strategy, {})
        labels = sorted(accuracy)
        values = [100 * accuracy[c] for c in labels]
        lowest = min([lowest, *values])
        classes.bar([i + k * width for i in range(len(labels))], values, width, color=colors[names.index(strategy)],
                    label=f"{strategy} ({', '.join(said)})")
        classes.set_xticks([i + width * (len(roles) - 1) / 2 for i in range(len(labels))], [str(c) for c in labels])
    classes.set_ylim(max(lowest - 10, 0), 100.5)
    classes.set_xlabel("class")
    classes.set_ylabel("test accuracy, % (all seeds)")
    classes.set_title("per class: the reference and the recommended")
    classes.legend(fontsize=8, loc="lower right")
    classes.grid(True, axis="y", alpha=0.3)
    fig.suptitle(title + ("\n" + decision["lines"][0] if decision.get("lines") else ""), fontsize=10)
    # one legend for the strategies, below the panels, so that it hides no point or curve
    handles, labels = left.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(rows), 8), fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0.05, 1, 1), w_pad=4)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(rows: list[dict], output_dir: str | Path, title: str = "strategy comparison",
                 alpha: float = 0.05, margin_points: float = DEFAULT_MARGIN_POINTS,
                 reference: str = BEST_VAL, tunings: dict[str, dict] | None = None) -> tuple[dict[str, Path], dict]:
    """comparison.{csv,md,png} (a row per strategy), comparison_runs.csv (a row per run),
    comparison_per_class.csv and, when the strategies were tuned, tuning.png in `output_dir`; returns their paths
    and the summary."""
    if not succeeded(rows):
        raise ValueError(f"no runs with a metrics.json under {output_dir}")
    # refuses runs that cannot be paired before writing
    summary = summarise(rows, alpha, margin_points, reference, tunings)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = {kind: output_dir / f"comparison.{kind}" for kind in ("csv", "md", "png")}
    paths.update(runs=output_dir / "comparison_runs.csv", per_class=output_dir / "comparison_per_class.csv")
    strategies = summary["strategies"]
    # a failed run is a row too, with `failed` and `error` and empty measurements
    for path, table in ((paths["csv"], strategies + [r for r in rows if r.get("failed")]), (paths["runs"], rows)):
        keys = [key for key, _, _ in COLUMNS] + sorted({k for r in table for k in r} - {k for k, _, _ in COLUMNS})
        with open(path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=keys, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(table)
    per_class = summary["decision"].get("per_class", {})
    classes = sorted({c for accuracy in per_class.values() for c in accuracy})
    with open(paths["per_class"], "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["strategy", *[f"class_{c}" for c in classes]])
        for strategy, accuracy in per_class.items():
            writer.writerow([strategy, *[f"{accuracy[c]:.4f}" if c in accuracy else "" for c in classes]])
    first = strategies[0]
    header = (f"# {title}\n\nbackbone `{first.get('backbone')}`, data `{first.get('data')}`, "
              f"{first.get('epochs')} epochs, device `{first.get('device')}`, precision `{first.get('precision')}`, "
              f"seeds {first.get('seed_list')}\n\n")
    paths["md"].write_text(header + format_markdown(summary))
    plot(summary, paths["png"], f"{title}: {first.get('backbone')} on {first.get('data')}")
    if any(r.get("trials") for r in (tunings or {}).values()):
        paths["tuning"] = output_dir / "tuning.png"
        plot_tuning(tunings, paths["tuning"])
    return paths, summary
