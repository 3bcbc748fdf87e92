"""What a comparison's data supports, from its runs: per strategy the test accuracy over seeds (and splits) with a
95% interval, its paired difference to a reference chosen on val, a verdict (different / equivalent / undecided),
and the cheapest strategy shown equivalent to the reference. The statistics are in paired_statistics.py and
docs/comparison-statistics.md; this module reads the runs, pairs them and applies them.

- Pairing: runs on one test split (`test_split_id`) are paired image by image through predictions.csv's `index`
  (every run of a split must list the same indices), and a strategy's runs with the reference's by seed.
- Reference: `reference` names a strategy, or `best_val` takes the best mean `best_val_acc`: never the test split.
- Verdicts: "equivalent" when the difference's interval lies within +-margin, in a fixed sequence ordered by cost
  (from the reference down to the cheapest, then upwards), stopping at the first not shown; "different" when the
  interval excludes 0; else "undecided", with the smallest difference the design could detect.
- Cost: mean fit time, plus one feature extraction charged to every strategy that reads the feature cache (whichever
  run paid it), plus the strategy's tuning (compare.tune: the training time its trials took); and trainable
  parameters.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from finetune.compare import statistics as ps
from finetune.errors import ConfigError

BEST_VAL = "best_val"
DEFAULT_MARGIN_POINTS = 2.0


def has_predictions(run: dict) -> bool:
    return bool(run.get("predictions")) and (Path(run["run_dir"]) / run["predictions"]).exists()


def load_predictions(run: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(index, label, predicted) of the run's test samples, sorted by index; refuses a missing or short file."""
    name = Path(run["run_dir"]).name
    if not has_predictions(run):
        raise ConfigError(f"run {name} has no predictions.csv ({run['run_dir']}): every run of a comparison needs its "
                          f"per-sample test predictions; rerun it or leave its folder out")
    with open(Path(run["run_dir"]) / run["predictions"], newline="") as handle:
        rows = sorted((int(r["index"]), int(r["label"]), int(r["predicted"])) for r in csv.DictReader(handle))
    expected = run.get("test_samples")
    if expected is not None and len(rows) != int(expected):
        raise ConfigError(f"run {name}: predictions.csv has {len(rows)} rows but metrics.json tested {expected} "
                          f"samples (a cut file?): rerun it or leave its folder out")
    table = np.array(rows, dtype=np.int64).reshape(-1, 3)
    return table[:, 0], table[:, 1], table[:, 2]


def check_runs(runs: list[dict]) -> None:
    """One run per (strategy, split, seed), each with its trainable parameter count, all of one dataset."""
    seen = set()
    for run in runs:
        key = (run["strategy"], run.get("test_split_id"), run.get("seed"))
        if key in seen:
            raise ConfigError(f"two runs of strategy {run['strategy']} with seed {run.get('seed')} on one split "
                              f"({run['run_dir']}): one run per strategy, split and seed")
        seen.add(key)
        if not isinstance(run.get("trainable_params"), int) or isinstance(run.get("trainable_params"), bool):
            raise ConfigError(f"run {Path(run['run_dir']).name} has no trainable_params in its metrics.json: the "
                              f"recommendation by parameters needs it for every run; rerun it or leave its folder out")
    datasets = {(run.get("data"), run.get("backbone")) for run in runs}
    if len(datasets) > 1:
        raise ConfigError(f"the runs are of {len(datasets)} datasets or backbones ({sorted(map(str, datasets))[:3]}): "
                          f"compare runs of one data config and backbone (data.split_seed may vary: compare.splits)")


def paired_tables(runs: list[dict]) -> tuple[dict, dict]:
    """({strategy: {split: {seed: correct}}}, per-run (strategy, labels, predicted)), refusing runs of one split whose
    test indices differ."""
    correct: dict[str, dict[str, dict]] = {}
    indices: dict[str, tuple[np.ndarray, str]] = {}
    loaded = []
    for run in runs:
        index, labels, predicted = load_predictions(run)
        split = str(run.get("test_split_id"))
        first = indices.setdefault(split, (index, Path(run["run_dir"]).name))
        if not np.array_equal(first[0], index):
            raise ConfigError(f"runs {first[1]} and {Path(run['run_dir']).name} report test_split_id {split} but "
                              f"different test indices ({len(first[0])} against {len(index)} samples): paired "
                              f"differences need the same images; rerun them on one data config and data.split_seed")
        correct.setdefault(run["strategy"], {}).setdefault(split, {})[run.get("seed")] = labels == predicted
        loaded.append((run["strategy"], labels, predicted))
    return correct, loaded


def extraction_charge(runs: list[dict], paid_in_tuning: float = 0.0) -> float:
    """One feature extraction's seconds: what the tuning paid for it (the head grid extracts train and val) plus the
    mean over the runs that extracted the rest (missed the cache); with neither, the largest recorded (the features
    were extracted before this comparison, and its time is unknown: 0)."""
    missed = [float(r["extract_seconds"]) for r in runs if r.get("extract_seconds") is not None
              and r.get("cache_hit") is False]
    if missed or paid_in_tuning:
        return paid_in_tuning + (float(np.mean(missed)) if missed else 0.0)
    return max([float(r.get("extract_seconds") or 0.0) for r in runs if "extract_seconds" in r], default=0.0)


def choose_reference(runs_of: dict[str, list[dict]], reference: str, cost: dict[str, float]) -> str:
    if reference != BEST_VAL:
        if reference not in runs_of:
            raise ConfigError(f"compare.reference={reference} is not among the strategies compared; choose one of: "
                              f"{', '.join([BEST_VAL, *sorted(runs_of)])}")
        return reference
    val = {s: [r["best_val_acc"] for r in group if r.get("best_val_acc") is not None] for s, group in runs_of.items()}
    scored = {s: float(np.mean(v)) for s, v in val.items() if v}
    if not scored:
        raise ConfigError("compare.reference=best_val needs best_val_acc in the runs' metrics.json and none has it; "
                          f"name the reference instead, one of: {', '.join(sorted(runs_of))}")
    return max(scored, key=lambda s: (scored[s], -cost[s], s))


def test_order(cost: dict[str, float], reference: str) -> list[str]:
    """The fixed sequence, from costs alone (known before any test): the strategies cheaper than the reference from
    the dearest down, then the dearer ones from the cheapest up."""
    cheaper = sorted((s for s in cost if s != reference and cost[s] <= cost[reference]), key=lambda s: (-cost[s], s))
    dearer = sorted((s for s in cost if s != reference and cost[s] > cost[reference]), key=lambda s: (cost[s], s))
    return cheaper + dearer


def decide(runs: list[dict], margin_points: float = DEFAULT_MARGIN_POINTS, reference: str = BEST_VAL,
           alpha: float = 0.05, tuning_seconds: dict[str, float] | None = None,
           tuning_extract_seconds: float = 0.0) -> dict:
    """Per strategy (accuracy and interval, difference to the reference and its interval, verdict, cost) and the
    recommendation lines. `tuning_seconds`: what each strategy's tuning cost (compare.tune); the cost that orders
    the tests and picks the recommendation counts it. `tuning_extract_seconds`: feature extraction the tuning paid
    (part of the one extraction charged to every cache reader)."""
    if not runs:
        return {"strategies": {}, "lines": ["no run finished: nothing to compare"]}
    check_runs(runs)
    correct, loaded = paired_tables(runs)
    runs_of: dict[str, list[dict]] = {}
    for run in runs:
        runs_of.setdefault(run["strategy"], []).append(run)
    charge = extraction_charge(runs, tuning_extract_seconds)
    fit_cost = {s: float(np.mean([float(r.get("fit_seconds") or 0.0) for r in group]))
                + (charge if any("extract_seconds" in r for r in group) else 0.0) for s, group in runs_of.items()}
    tuned = tuning_seconds or {}
    cost = {s: fit_cost[s] + float(tuned.get(s, 0.0)) for s in fit_cost}
    best = choose_reference(runs_of, reference, cost)
    level, margin = 1 - alpha, margin_points / 100
    stats: dict[str, dict] = {}
    for strategy, splits in correct.items():
        tables = [np.stack([per_seed[s] for s in sorted(per_seed, key=str)]) for per_seed in splits.values()]
        accuracy = ps.interval(tables, level)
        group = runs_of[strategy]
        stats[strategy] = {"test_acc_mean": float(accuracy.estimate), "ci_low": float(accuracy.low),
                           "ci_high": float(accuracy.high), "seed_sd": float(accuracy.seed_sd),
                           "seeds": len({r.get("seed") for r in group}), "splits": len(splits), "runs": len(group),
                           "fit_cost_seconds": fit_cost[strategy], "tuning_seconds": float(tuned.get(strategy, 0.0)),
                           "cost_seconds": cost[strategy], "trainable_params": group[0]["trainable_params"],
                           "best_val_mean": float(np.mean([r.get("best_val_acc") or np.nan for r in group]))}
        if strategy == best:
            stats[strategy].update(verdict="reference", diff=0.0)
            continue
        tables = []
        for split, per_seed in splits.items():
            shared = sorted(set(per_seed) & set(correct[best].get(split, {})), key=str)
            if shared:
                tables.append(np.stack([per_seed[s].astype(np.int8) - correct[best][split][s].astype(np.int8)
                                        for s in shared]))
        if not tables:
            raise ConfigError(f"strategy {strategy} and the reference, {best}, share no (split, seed): nothing to "
                              f"pair; run both with the same compare.seeds")
        difference = ps.interval(tables, level)
        stats[strategy].update(diff=float(difference.estimate), diff_low=float(difference.low),
                               diff_high=float(difference.high), diff_seed_sd=float(difference.seed_sd),
                               detectable=float(difference.detectable), paired_runs=difference.runs,
                               verdict=str(ps.verdict(difference, margin)))
    order = test_order(cost, best)
    shown = {s: stats[s]["verdict"] == "equivalent" for s in order}
    kept = ps.fixed_sequence(order, shown)
    for strategy in order:
        if strategy in kept:
            continue
        s = stats[strategy]
        if s["verdict"] == "equivalent":  # within the margin, but the sequence stopped before it
            s["verdict"] = "different" if s["diff_low"] > 0 or s["diff_high"] < 0 else "undecided"
            s["sequence_stopped"] = True
    candidates = [best, *kept]
    by_time = min(candidates, key=lambda s: (cost[s], s))
    by_params = min(candidates, key=lambda s: (stats[s]["trainable_params"], cost[s], s))
    return {"strategies": stats, "best": best, "reference": best, "reference_rule": reference, "alpha": alpha,
            "margin_points": margin_points, "order": order, "by_time": by_time, "by_params": by_params,
            "extraction_seconds": charge, "tuned": bool(tuned),
            "lines": recommendation_lines(stats, best, reference, by_time, by_params, margin_points, alpha),
            "per_class": per_class_accuracy(loaded)}


def _acc(stats: dict, strategy: str) -> str:
    s = stats[strategy]
    return f"{s['test_acc_mean']:.3f} [{s['ci_low']:.3f}, {s['ci_high']:.3f}]"


def _difference(s: dict) -> str:
    return f"{100 * s['diff']:+.1f} [{100 * s['diff_low']:+.1f}, {100 * s['diff_high']:+.1f}] points"


def recommendation_lines(stats: dict, best: str, reference_rule: str, by_time: str, by_params: str,
                         margin_points: float, alpha: float) -> list[str]:
    s = stats[best]
    design = (f"{s['seeds']} seed{'s' if s['seeds'] > 1 else ''}" + (f" x {s['splits']} splits" if s["splits"] > 1
                                                                         else ""))
    chosen = ("the best mean val accuracy" if reference_rule == BEST_VAL else "compare.reference")
    level = f"{1 - alpha:.0%} intervals, margin +-{margin_points:g} points, {design}"
    if len(stats) == 1:
        return [f"recommended by fit time and trainable parameters: {best}, the only strategy: {_acc(stats, best)}"]
    lines = []
    kinds = [("fit time and trainable parameters", by_time)] if by_time == by_params else \
        [("fit time", by_time), ("trainable parameters", by_params)]
    for kind, choice in kinds:
        if choice == best:
            lines.append(f"recommended by {kind}: {best}, the reference ({chosen}): {_acc(stats, best)}; no cheaper "
                         f"strategy is shown equivalent to it ({level})")
            continue
        ratios = []
        if "fit time" in kind:
            fit = stats[choice]["fit_cost_seconds"] / max(stats[best]["fit_cost_seconds"], 1e-9)
            total = stats[choice]["cost_seconds"] / max(stats[best]["cost_seconds"], 1e-9)
            ratios.append(f"{fit:.0%} of its fit time" if not any(stats[x]["tuning_seconds"] for x in stats) else
                          f"{total:.0%} of its cost with tuning ({fit:.0%} of its fit time without)")
        if "parameters" in kind:
            ratios.append(f"{stats[choice]['trainable_params'] / max(stats[best]['trainable_params'], 1):.1%} of its "
                          f"trainable parameters")
        lines.append(f"recommended by {kind}: {choice}: {_acc(stats, choice)}, equivalent to the reference {best} "
                     f"({chosen}, {_acc(stats, best)}): difference {_difference(stats[choice])}; "
                     f"{', '.join(ratios)} ({level})")
    if all(stats[x]["verdict"] in ("reference", "undecided") for x in stats):
        lines.append(f"no strategy is shown equivalent to or different from {best}: the data cannot rank them "
                     f"(the smallest difference this design detects: "
                     f"{min(100 * stats[x]['detectable'] for x in stats if x != best):.1f} points)")
    return lines


def per_class_accuracy(loaded: list[tuple[str, np.ndarray, np.ndarray]]) -> dict[str, dict[int, float]]:
    """{strategy: {class: accuracy}} over every seed's test predictions, from (strategy, labels, predicted) per run."""
    totals: dict[str, dict[int, list[int]]] = {}
    for strategy, labels, predicted in loaded:
        for label in np.unique(labels):
            right, count = totals.setdefault(strategy, {}).setdefault(int(label), [0, 0]), labels == label
            right[0] += int(np.sum(predicted[count] == label))
            right[1] += int(np.sum(count))
    return {strategy: {label: right / count for label, (right, count) in sorted(classes.items())}
            for strategy, classes in totals.items()}
