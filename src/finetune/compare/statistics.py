"""The statistics behind a strategy comparison, on arrays: no files, no runs (decide.py reads the runs).

The unit of every interval is a table of 0/1 correctness, training seeds x test images, per split. The seeds and the
images are crossed (every seed is tested on every image), so the variance of a mean over the table has three parts,
estimated by the two-way random-effects ANOVA (method of moments):

    Var(mean) = var_image / images + var_seed / seeds + var_residual / (images * seeds)

- var_image: what an image adds wherever it is tested (a hard image, or one a strategy always misses);
- var_seed: what a training seed adds on every image (a run that came out better or worse overall);
- var_residual: the seed x image interaction (the borderline images a seed flips).

For the difference between a strategy and the reference, the table holds the per-(seed, image) difference of their
correctness (runs paired by seed, images by test index). The interval is a generalized pivot that carries the seed
part's few degrees of freedom exactly (see `interval`), so with few seeds it widens as it must, where a percentile
bootstrap cannot reach beyond the best and worst seed. Splits add a third level: the mean over splits, with the t
interval over split means where they scatter more than the per-split parts predict (K - 1 degrees of freedom).

`python -m finetune.compare.statistics` prints the simulations (false "different" rate, coverage, power, the chance
of showing equivalence) that justify the method and the defaults; tests/compare/test_compare.py asserts them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats

LEVEL = 0.95
POWER = 0.8  # the power behind "the smallest difference the design could detect"
VERDICTS = ("reference", "different", "equivalent", "undecided")


@dataclass(frozen=True)
class Interval:
    """A mean (or mean difference) over splits x seeds x images with its `LEVEL` interval; arrays of any batch shape."""

    estimate: np.ndarray
    low: np.ndarray
    high: np.ndarray
    standard_error: np.ndarray  # the point estimate of the mean's standard deviation (all components)
    seed_sd: np.ndarray  # spread over seeds: standard deviation of the per-seed means (nan with one seed)
    runs: int  # seed x split replicates behind it

    @property
    def detectable(self) -> np.ndarray:
        """The smallest true difference this design finds with probability `POWER`: the interval's half-width plus
        the normal quantile of the power in standard errors."""
        return (self.high - self.low) / 2 + stats.norm.ppf(POWER) * self.standard_error


def variance_components(table: np.ndarray) -> dict:
    """The mean of `table` [..., seeds, images] and the parts of its variance, by the two-way ANOVA:

    image: (ms_image - ms_residual) / (seeds images), cut at 0; estimated from images - 1 degrees of freedom, many;
    seeds: ms_seed / (seeds images), the variance of the mean of the seed means (seed effect and residual), from only
           seeds - 1 degrees of freedom;
    floor: ms_residual / (seeds images), the residual's share of `seeds`, known precisely: the seed part is never
           below it. With one seed, the image part holds everything the table can show and `seeds` is 0."""
    table = np.asarray(table, dtype=np.float64)
    seeds, images = table.shape[-2:]
    if images < 2:
        raise ValueError(f"a mean over {images} test image(s) has no interval: at least 2 are needed")
    mean = table.mean(axis=(-2, -1))
    ms_image = seeds * table.mean(axis=-2).var(axis=-1, ddof=1)
    if seeds == 1:
        zero = np.zeros_like(mean)
        return {"mean": mean, "image": ms_image / images, "seeds": zero, "floor": zero, "seed_count": 1}
    ms_seed = images * table.mean(axis=-1).var(axis=-1, ddof=1)
    total = ((table - mean[..., None, None]) ** 2).sum(axis=(-2, -1))
    ms_residual = np.maximum(total - (seeds - 1) * ms_seed - (images - 1) * ms_image, 0.0) / ((seeds - 1) * (images - 1))
    cells = seeds * images
    return {"mean": mean, "image": np.maximum(ms_image - ms_residual, 0.0) / cells, "seeds": ms_seed / cells,
            "floor": ms_residual / cells, "seed_count": seeds}


def _chi_square_draws(seeds: int, draws: int, split: int) -> np.ndarray:
    """Quantiles of chi-square(seeds - 1) at `draws` evenly spaced levels; a fixed shuffle per split beyond the first,
    so that several splits' draws are independent (a Latin hypercube) and the interval is deterministic."""
    quantiles = stats.chi2.ppf((np.arange(draws) + 0.5) / draws, max(seeds - 1, 1))
    return quantiles if split == 0 else np.random.default_rng(split).permutation(quantiles)


def interval(tables: list[np.ndarray], level: float = LEVEL, draws: int = 256) -> Interval:
    """The mean over splits of each split's table [..., seeds, images], with its `level` interval.

    A generalized pivotal quantity (Weerahandi 1993): the mean's variance is drawn as image part + max(seed part x
    (seeds - 1) / chi-square(seeds - 1), floor), which carries the seed part's few degrees of freedom exactly, and the
    half-width q solves P(|Z| sqrt(variance) <= q) = level. Satterthwaite's t, tried first, gave 0.07 false
    "different" with 3 seeds (see the docs). Several splits: the per-split variances average (/ K^2), and where
    the split means scatter more than that, the t interval over split means (K - 1 degrees of freedom) is used."""
    parts = [variance_components(table) for table in tables]
    splits = len(parts)
    estimate = np.mean([p["mean"] for p in parts], axis=0)
    variance_draws = 0.0
    for k, p in enumerate(parts):
        chi = _chi_square_draws(p["seed_count"], draws, k)
        seed_draws = p["seeds"][..., None] * (max(p["seed_count"] - 1, 1) / chi)
        variance_draws = variance_draws + p["image"][..., None] + np.maximum(seed_draws, p["floor"][..., None])
    variance_draws = variance_draws / splits ** 2
    point_variance = sum(p["image"] + np.maximum(p["seeds"], p["floor"]) for p in parts) / splits ** 2
    spread = np.sqrt(variance_draws)
    low_q, high_q = np.zeros_like(estimate), stats.norm.ppf(1 - (1 - level) / 4) * spread.max(axis=-1)
    for _ in range(40):  # bisection on the pivot's coverage, monotone in q
        middle = (low_q + high_q) / 2
        with np.errstate(divide="ignore", invalid="ignore"):
            covered = np.where(spread > 0, 2 * stats.norm.cdf(middle[..., None] / spread) - 1, 1.0).mean(axis=-1)
        low_q, high_q = np.where(covered < level, middle, low_q), np.where(covered < level, high_q, middle)
    half = high_q
    if splits > 1:
        means = np.stack([p["mean"] for p in parts])
        between = np.sqrt(means.var(axis=0, ddof=1) / splits)
        half = np.maximum(half, stats.t.ppf(1 - (1 - level) / 2, splits - 1) * between)
        point_variance = np.maximum(point_variance, between ** 2)
    seed_sd = [np.asarray(t, dtype=np.float64).mean(axis=-1).std(axis=-1, ddof=1) for t in tables
               if np.shape(t)[-2] > 1]
    seed_sd = np.mean(seed_sd, axis=0) if seed_sd else np.full(np.shape(estimate), np.nan)
    runs = sum(np.shape(t)[-2] for t in tables)
    return Interval(estimate, estimate - half, estimate + half, np.sqrt(point_variance), seed_sd, runs)


def verdict(difference: Interval, margin: float) -> np.ndarray:
    """"equivalent" when the whole interval lies within +-margin (two one-sided tests at (1 - LEVEL) / 2 each),
    else "different" when it excludes 0, else "undecided"; one run per strategy is "undecided" (a seed's share of
    the variance cannot be measured from one run)."""
    low, high = np.asarray(difference.low), np.asarray(difference.high)
    out = np.where((low > -margin) & (high < margin), "equivalent",
                   np.where((low > 0) | (high < 0), "different", "undecided"))
    return np.where(difference.runs >= 2, out, "undecided")


def fixed_sequence(order: list[str], shown: dict[str, bool]) -> list[str]:
    """The claims a fixed-sequence procedure keeps: each hypothesis in `order` (set before the data, here by cost)
    is tested at the full level, and testing stops at the first that is not shown. Adding hypotheses can only
    put more steps before a given one, never lower its bar (which is what makes Holm gameable)."""
    kept = []
    for name in order:
        if not shown[name]:
            break
        kept.append(name)
    return kept


# -- simulation: the generative model the docs and tests use -------------------------------------------------------

def logit(p):
    return np.log(p / (1 - p))


def population_accuracy(base_logit: float, spread: float) -> float:
    """E[sigmoid(Z)] for Z ~ N(base_logit, spread^2), by Gauss-Hermite quadrature."""
    nodes, weights = np.polynomial.hermite_e.hermegauss(80)
    return float(np.sum(weights / np.sqrt(2 * np.pi) / (1 + np.exp(-(base_logit + spread * nodes)))))


def shift_for_accuracy(target: float, spread: float) -> float:
    """The logit shift whose population accuracy is `target` under a total logit spread `spread`."""
    from scipy.optimize import brentq

    return brentq(lambda b: population_accuracy(b, spread) - target, -20, 20)


@dataclass(frozen=True)
class Scenario:
    """Two strategies on `samples` test images (per split), `seeds` seeds each, `splits` splits.

    A run's chance to get image i right is sigmoid(difficulty_i + strategy's image effect + run effect + shift):
    difficulty ~ N(0, image_sd^2) shared by the strategies (pairing cancels it), the strategy x image effect
    ~ N(0, interaction_sd^2) (what makes one strategy miss an image the other gets), the run effect ~ N(0, seed_sd^2)
    per (strategy, seed, split) (a seed that trains a better or worse model), and the shift set so that the
    population accuracies are `accuracy` and `accuracy + difference`."""

    seeds: int = 3
    samples: int = 400
    splits: int = 1
    accuracy: float = 0.88
    difference: float = 0.0
    image_sd: float = 2.5
    interaction_sd: float = 1.0
    seed_sd: float = 0.0

    @property
    def spread(self) -> float:
        return float(np.sqrt(self.image_sd ** 2 + self.interaction_sd ** 2 + self.seed_sd ** 2))


def simulate(scenario: Scenario, repetitions: int, generator: np.random.Generator) -> list[np.ndarray]:
    """Per split: correctness [repetitions, 2 (reference, other), seeds, samples], bool."""
    s = scenario
    shifts = np.array([shift_for_accuracy(s.accuracy, s.spread),
                       shift_for_accuracy(s.accuracy + s.difference, s.spread)])
    out = []
    for _ in range(s.splits):
        difficulty = generator.normal(0, s.image_sd, (repetitions, 1, 1, s.samples))
        interaction = generator.normal(0, s.interaction_sd, (repetitions, 2, 1, s.samples))
        run = generator.normal(0, s.seed_sd, (repetitions, 2, s.seeds, 1))
        chance = 1 / (1 + np.exp(-(difficulty + interaction + run + shifts[None, :, None, None])))
        out.append(generator.random(chance.shape) < chance)
    return out


def simulated_difference(scenario: Scenario, repetitions: int, seed: int = 0) -> Interval:
    """The interval of (other - reference) in each of `repetitions` simulated comparisons."""
    tables = simulate(scenario, repetitions, np.random.default_rng(seed))
    return interval([t[:, 1].astype(np.int8) - t[:, 0].astype(np.int8) for t in tables])


def operating_characteristics(scenario: Scenario, margin: float, repetitions: int = 2000, seed: int = 0) -> dict:
    """How often each verdict comes out, and how often the interval covers the true difference."""
    difference = simulated_difference(scenario, repetitions, seed)
    said = verdict(difference, margin)
    covered = (difference.low <= scenario.difference) & (scenario.difference <= difference.high)
    return {"different": float(np.mean(said == "different")), "equivalent": float(np.mean(said == "equivalent")),
            "undecided": float(np.mean(said == "undecided")), "coverage": float(np.mean(covered)),
            "half_width": float(np.median(difference.high - difference.low) / 2),
            "detectable": float(np.median(difference.detectable))}


def main() -> None:
    """The simulation table of docs/comparison-statistics.md."""
    print("seeds seed_sd diff samples | different equivalent undecided coverage | half-width detectable (points)")
    for seed_sd in (0.0, 0.3, 0.5):
        for difference in (0.0, 0.03):
            for seeds in (1, 3, 5, 8):
                scenario = Scenario(seeds=seeds, samples=400, difference=difference, seed_sd=seed_sd)
                r = operating_characteristics(scenario, margin=0.02)
                print(f"{seeds:5d} {seed_sd:7.1f} {difference:4.2f} {400:7d} | {r['different']:9.3f} "
                      f"{r['equivalent']:10.3f} {r['undecided']:9.3f} {r['coverage']:8.3f} | "
                      f"{100 * r['half_width']:10.2f} {100 * r['detectable']:10.2f}")


if __name__ == "__main__":
    main()
