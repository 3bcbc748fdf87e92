"""What a comparison's data supports: per strategy the mean test accuracy over seeds with a 95% interval, a paired
test of each strategy against the most accurate one on the same test samples (Holm-corrected), and the cheapest
strategy that cannot be told from the most accurate one.

- Interval: a two-level percentile bootstrap. Each resample draws the seeds with replacement, then the test samples
  with replacement (the same samples for every seed), and takes the mean accuracy; so it covers both the training
  noise (seed) and the finite test set. With one seed it is the bootstrap over test samples alone.
- Paired test: McNemar's exact test (scipy's binomial test on the discordant pairs: samples one strategy gets right
  and the other wrong). With several seeds, runs are paired by seed and the discordant pairs of every seed are pooled
  (each seed a matched set of the same test samples). Holm's step-down correction over the comparisons made.
- Recommendation: among the strategies whose corrected p-value against the most accurate is at least `alpha`
  (not distinguishable), the one with the shortest fit (fit + extraction, mean over seeds), and separately the one
  with the fewest trainable parameters.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from scipy.stats import binomtest

from finetune.errors import ConfigError

LEVEL = 0.95
RESAMPLES = 2000


def has_predictions(run: dict) -> bool:
    return bool(run.get("predictions")) and (Path(run["run_dir"]) / run["predictions"]).exists()


def load_labels_and_predicted(run: dict) -> tuple[np.ndarray, np.ndarray]:
    """(labels, predicted classes) of the run's test samples, by index (its predictions.csv)."""
    with open(Path(run["run_dir"]) / run["predictions"], newline="") as handle:
        rows = sorted((int(r["index"]), int(r["label"]), int(r["predicted"])) for r in csv.DictReader(handle))
    return np.array([r[1] for r in rows], dtype=np.int64), np.array([r[2] for r in rows], dtype=np.int64)


def bootstrap_interval(correct: np.ndarray, level: float = LEVEL, resamples: int = RESAMPLES,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile interval of the mean accuracy of `correct` [seeds, samples], resampling seeds and samples."""
    generator = np.random.default_rng(seed)
    seeds, samples = correct.shape
    pick_seeds = generator.integers(0, seeds, (resamples, seeds))
    pick_samples = generator.integers(0, samples, (resamples, samples))
    per_seed = correct.astype(np.float64)
    means = np.array([per_seed[np.ix_(s, i)].mean() for s, i in zip(pick_seeds, pick_samples)])
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def mcnemar_exact(a: np.ndarray, b: np.ndarray) -> tuple[float, int, int]:
    """(two-sided p, samples only a gets right, samples only b gets right) for paired correctness arrays (any shape:
    several seeds' pairs are pooled)."""
    only_a, only_b = int(np.sum(a & ~b)), int(np.sum(~a & b))
    if only_a + only_b == 0:
        return 1.0, 0, 0
    return float(binomtest(only_a, only_a + only_b, 0.5).pvalue), only_a, only_b


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the given order."""
    order = np.argsort(p_values)
    adjusted, running = [0.0] * len(p_values), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def check_pairable(runs: list[dict]) -> None:
    """Runs to be paired must share one test split (same data, same split, same samples)."""
    splits = {run.get("test_split_id") for run in runs}
    if len(splits) > 1:
        first = {}
        for run in runs:
            first.setdefault(run.get("test_split_id"), f"{Path(run['run_dir']).name} on {run.get('test_split_id')}")
        examples = ", ".join(list(first.values())[:4])
        raise ConfigError(f"the runs were tested on {len(splits)} different splits or datasets (e.g. {examples}): "
                          f"paired tests would be meaningless; compare runs of one data config and data.split_seed")
    seen = set()
    for run in runs:
        key = (run["strategy"], run.get("seed"))
        if key in seen:
            raise ConfigError(f"two runs of strategy {run['strategy']} with seed {run.get('seed')} "
                              f"({run['run_dir']}): one run per strategy and seed")
        seen.add(key)


def fit_cost(run: dict) -> float:
    return float(run.get("fit_seconds") or 0.0) + float(run.get("extract_seconds") or 0.0)


def decide(runs: list[dict], alpha: float = 0.05) -> dict:
    """Per strategy (mean, interval, p vs the best, ...) and the recommendation, from runs with predictions."""
    with_predictions = [run for run in runs if has_predictions(run)]
    if not with_predictions:
        return {"strategies": {}, "lines": ["no run has per-sample predictions (predictions.csv): no intervals"]}
    check_pairable(with_predictions)
    by_strategy: dict[str, dict[int, np.ndarray]] = {}
    runs_of: dict[str, list[dict]] = {}
    loaded = []  # (strategy, labels, predicted) of every run: each predictions.csv is read once
    for run in with_predictions:
        labels, predicted = load_labels_and_predicted(run)
        by_strategy.setdefault(run["strategy"], {})[run.get("seed")] = labels == predicted
        runs_of.setdefault(run["strategy"], []).append(run)
        loaded.append((run["strategy"], labels, predicted))
    stats = {}
    for strategy, per_seed in by_strategy.items():
        correct = np.stack([per_seed[s] for s in sorted(per_seed, key=str)])
        low, high = bootstrap_interval(correct)
        group = runs_of[strategy]
        stats[strategy] = {"test_acc_mean": float(correct.mean()), "ci_low": low, "ci_high": high,
                           "seeds": len(per_seed), "fit_cost_seconds": float(np.mean([fit_cost(r) for r in group])),
                           "trainable_params": group[0].get("trainable_params")}
    best = max(stats, key=lambda s: (stats[s]["test_acc_mean"], -stats[s]["fit_cost_seconds"]))
    others = [s for s in stats if s != best]
    raw = []
    for strategy in others:
        seeds = sorted(set(by_strategy[strategy]) & set(by_strategy[best]), key=str)
        if not seeds:
            raise ConfigError(f"strategy {strategy} and the most accurate, {best}, share no seed: nothing to pair")
        p, only_other, only_best = mcnemar_exact(np.stack([by_strategy[strategy][s] for s in seeds]),
                                                 np.stack([by_strategy[best][s] for s in seeds]))
        stats[strategy].update(p_raw=p, discordant_right=only_other, discordant_wrong=only_best, paired_seeds=len(seeds))
        raw.append(p)
    for strategy, adjusted in zip(others, holm(raw)):
        stats[strategy]["p_holm"] = adjusted
        stats[strategy]["distinguishable"] = adjusted < alpha
    stats[best].update(p_raw=None, p_holm=None, distinguishable=False)
    tied = [s for s in stats if not stats[s]["distinguishable"]]
    cheapest_time = min(tied, key=lambda s: (stats[s]["fit_cost_seconds"], s))
    cheapest_params = min(tied, key=lambda s: (stats[s]["trainable_params"] or 0, stats[s]["fit_cost_seconds"]))
    return {"strategies": stats, "best": best, "alpha": alpha, "by_time": cheapest_time, "by_params": cheapest_params,
            "lines": recommendation_lines(stats, best, cheapest_time, cheapest_params, alpha),
            "per_class": per_class_accuracy(loaded)}


def _acc(stats: dict, strategy: str) -> str:
    s = stats[strategy]
    return f"{s['test_acc_mean']:.3f} [{s['ci_low']:.3f}, {s['ci_high']:.3f}]"


def recommendation_lines(stats: dict, best: str, by_time: str, by_params: str, alpha: float) -> list[str]:
    seeds = max(s["seeds"] for s in stats.values())
    level = f"Holm-corrected McNemar, alpha {alpha:g}, {seeds} seed{'s' if seeds > 1 else ''}"
    tied = [s for s in stats if not stats[s]["distinguishable"]]
    lines = []
    if len(stats) == 1:
        return [f"one strategy: {best}: {_acc(stats, best)}"]
    if len(tied) == len(stats):
        lines.append(f"no strategy is distinguishable from the most accurate, {best} ({_acc(stats, best)}), "
                     f"at these seeds and test samples ({level}): the data cannot rank them")
    kinds = [("fit time and trainable parameters", by_time)] if by_time == by_params else \
        [("fit time", by_time), ("trainable parameters", by_params)]
    for kind, choice in kinds:
        if choice == best:
            lines.append(f"recommended by {kind}: {best}: {_acc(stats, best)}, the most accurate; nothing cheaper is "
                         f"indistinguishable from it ({level})")
            continue
        ratios = []
        if "fit time" in kind:
            ratios.append(f"{stats[choice]['fit_cost_seconds'] / max(stats[best]['fit_cost_seconds'], 1e-9):.0%} of "
                          f"its fit time")
        if "parameters" in kind:
            ratios.append(f"{(stats[choice]['trainable_params'] or 0) / max(stats[best]['trainable_params'] or 1, 1):.1%}"
                          f" of its trainable parameters")
        lines.append(f"recommended by {kind}: {choice}: {_acc(stats, choice)}, not distinguishable from {best} "
                     f"({_acc(stats, best)}, p={stats[choice]['p_holm']:.2g}); {', '.join(ratios)} ({level})")
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
