"""Verdicts at matched quality with the training seed as the unit of evidence (docs/method.md,
"Verdicts").

A comparison fixes quality levels (the baseline's fitted checkpoint qualities inside the range every
run of both models reaches, pipeline/evaluate/frontier.py) and scores each run (seed) once: the mean of its
frontier at those levels. Everything else is read from those per-seed scores:

- the estimate: mean of the model's scores minus the baseline's (the same number as
  frontier.matched_difference's `matched`);
- a Welch t 95% interval on the per-seed scores (Welch 1947): seeds of different models are
  independent training runs with possibly different spreads;
- an exact permutation p over seed labels (Fisher 1935; Pitman 1937) that recomputes the whole
  statistic, the levels included, for every way of dealing the pooled runs into the two groups:
  two-sided, twice the smaller one-sided p, so the least p a design can reach is 2 / C(m + b, m)
  (3 vs 3: 0.1, 3 vs 6: 0.024, 6 vs 6: 0.002);
- an equivalence test (two one-sided Welch tests against a margin fixed in advance, Schuirmann
  1987): "indistinguishable" only when it passes, otherwise "inconclusive";
- floors: a side with no copy at the matched levels gets the Clopper-Pearson upper bound of 0 copies
  in its samples (Clopper & Pearson 1934), never a zero-width interval.

Samples within a run share the run's seed: a bootstrap over samples says how well one run is
measured, not how another seed would come out, so it draws figure bands only
(frontier.resample / frontier.band).
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import scipy.stats

from pipeline.evaluate.frontier import NO_COMMON_RANGE, NO_COMPARABLE_QUALITY, NO_QUALITY, Fit

BETTER, WORSE = "better", "worse"
INDISTINGUISHABLE, INCONCLUSIVE = "indistinguishable", "inconclusive"
NOT_COMPARABLE, BOTH_AT_FLOOR = "not comparable", "both at the floor"
BELOW_FLOOR_BOUND = "below the floor's bound"  # the model copies nothing, the baseline above that bound
ONE_SEED = "exploratory, one seed"  # a side with one seed has no seed spread: no verdict
CONFIDENCE = 0.95
ALPHA = 1.0 - CONFIDENCE
# The equivalence margin, fixed before any data: a difference in memorization ratio smaller than 2% of
# the samples is what "the same" may mean here (about 5 of 256 samples a checkpoint).
EQUIVALENCE_MARGIN = 0.02
EXACT_LIMIT = 50_000  # relabelings enumerated exactly; beyond it, this many random ones
PERMUTATION_SEED = 0
POWER_EFFECT_SD = 2.0  # the effect (in seed-to-seed sd) a confirmatory design must detect with 80% power
POWER = 0.8


@dataclass(frozen=True)
class SeedComparison:
    """model - baseline at matched quality, from per-seed scores. `estimate`, `low`/`high` (Welch
    interval of the difference; NaN with one seed a side), `p` (exact permutation, two-sided),
    `p_min` (the least p the design can reach), `equivalence_p` (the larger of the two one-sided
    tests against +-margin), the scores themselves, and each side's Clopper-Pearson upper bound
    where it copies nothing there (NaN otherwise). `relative`: estimate over the baseline's mean
    score with a delta-method Welch interval, NaN where the baseline is at the floor. `reason`: why
    not comparable (then every number is NaN)."""
    estimate: float
    low: float
    high: float
    p: float
    p_min: float
    equivalence_p: float
    model_scores: tuple[float, ...]
    baseline_scores: tuple[float, ...]
    model_bound: float = math.nan
    baseline_bound: float = math.nan
    relative: float = math.nan
    relative_low: float = math.nan
    relative_high: float = math.nan
    reason: str | None = None
    margin: float = EQUIVALENCE_MARGIN

    @property
    def seeds(self) -> tuple[int, int]:
        return len(self.model_scores), len(self.baseline_scores)

    @property
    def confirmatory(self) -> bool:
        """Enough seeds a side for 80% power at POWER_EFFECT_SD and a reachable p below ALPHA."""
        return min(self.seeds) >= seeds_for_power(POWER_EFFECT_SD) and self.p_min < ALPHA


# why a comparison is not comparable, as a number a metrics file can hold (its index; 0: comparable)
REASONS = (None, NO_COMMON_RANGE, NO_COMPARABLE_QUALITY, NO_QUALITY)


def not_comparable(reason: str, model_seeds: int = 0, baseline_seeds: int = 0) -> SeedComparison:
    nan = math.nan
    return SeedComparison(nan, nan, nan, nan, nan, nan, (nan,) * model_seeds, (nan,) * baseline_seeds, reason=reason)


# --- per-seed scores ----------------------------------------------------------------------------

@dataclass(frozen=True)
class _Pool:
    """Every run of both models on the common quality range: each run's frontier at every candidate
    level (any run's fitted checkpoint quality in the range) and at the range's best end, so that a
    relabeling of the runs only picks columns."""
    at_levels: np.ndarray   # [runs, candidate levels]
    owner: np.ndarray       # [candidate levels]: the run whose checkpoint each level is
    at_best: np.ndarray     # [runs]


def _pool(fits: Sequence[Fit]) -> _Pool | str:
    frontiers = [f.frontier for f in fits]
    if not all(np.isfinite(f.quality).all() for f in frontiers):
        return NO_QUALITY
    best, worst = max(f.best for f in frontiers), min(f.worst for f in frontiers)
    if best > worst:
        return NO_COMMON_RANGE
    levels, owner = [], []
    for i, f in enumerate(frontiers):
        inside = f.quality[(f.quality >= best) & (f.quality <= worst)]
        levels.extend(inside)
        owner.extend([i] * len(inside))
    levels = np.asarray(levels, np.float64)
    at_levels = np.stack([f(levels) for f in frontiers]) if len(levels) else np.zeros((len(fits), 0))
    return _Pool(at_levels, np.asarray(owner, int), np.array([float(f(best)) for f in frontiers]))


def _scores(pool: _Pool, baseline: np.ndarray, floor: float) -> np.ndarray | None:
    """Each run's mean frontier at the levels of the runs marked `baseline` (a boolean per run);
    None when nothing copies above `floor` at the range's best end (neither side's mean frontier)."""
    if max(pool.at_best[baseline].mean(), pool.at_best[~baseline].mean()) <= floor:
        return None
    columns = baseline[pool.owner] if len(pool.owner) else np.zeros(0, bool)
    if not columns.any():  # the range lies between two of the baseline's checkpoints: its best end
        return pool.at_best.copy()
    return pool.at_levels[:, columns].mean(1)


def _difference(scores: np.ndarray, baseline: np.ndarray) -> float:
    return float(scores[~baseline].mean() - scores[baseline].mean())


# --- tests --------------------------------------------------------------------------------------

def _welch(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(standard error, Welch-Satterthwaite degrees of freedom) of mean(a) - mean(b); NaN with a
    side of one seed (no spread known)."""
    if len(a) < 2 or len(b) < 2:
        return math.nan, math.nan
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    se2 = va + vb
    if se2 == 0:
        return 0.0, float(len(a) + len(b) - 2)
    return math.sqrt(se2), se2 ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))


def _t_interval(diff: float, se: float, dof: float, confidence: float) -> tuple[float, float]:
    if not math.isfinite(se):
        return math.nan, math.nan
    half = se * scipy.stats.t.ppf(0.5 + confidence / 2, dof) if se > 0 else 0.0
    return diff - half, diff + half


def equivalence_p(diff: float, se: float, dof: float, margin: float) -> float:
    """Two one-sided Welch t tests of |difference| < margin (Schuirmann 1987): the larger p. Below
    ALPHA the difference lies within +-margin at that level (the 90% interval inside the margin)."""
    if not math.isfinite(se):
        return math.nan
    if se == 0:
        return 0.0 if abs(diff) < margin else 1.0
    return float(max(scipy.stats.t.sf((diff + margin) / se, dof), scipy.stats.t.cdf((diff - margin) / se, dof)))


def _labelings(runs: int, baseline_runs: int, rng: np.random.Generator) -> np.ndarray:
    """[labelings, runs] booleans: every way of marking `baseline_runs` of `runs` as the baseline
    (exact), or EXACT_LIMIT random ones when there are more (Monte Carlo, Dwass 1957)."""
    if math.comb(runs, baseline_runs) <= EXACT_LIMIT:
        chosen = np.array(list(itertools.combinations(range(runs), baseline_runs)), int).reshape(-1, baseline_runs)
    else:
        chosen = np.argsort(rng.random((EXACT_LIMIT, runs)), axis=1)[:, :baseline_runs]
    marks = np.zeros((len(chosen), runs), bool)
    np.put_along_axis(marks, chosen, True, axis=1)
    return marks


def _differences(pool: _Pool, marks: np.ndarray, floor: float) -> np.ndarray:
    """_difference(_scores(pool, mark, floor), mark) for every row of `marks` at once (NaN where
    not comparable): the permutation test's statistic, vectorised over relabelings."""
    base, model = marks.sum(1), (~marks).sum(1)
    at_best = (pool.at_best * marks).sum(1) / base, (pool.at_best * ~marks).sum(1) / model
    columns = marks[:, pool.owner].astype(np.float64)  # [labelings, levels]: the baseline's levels
    count = columns.sum(1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        scores = np.where(count > 0, columns @ pool.at_levels.T / count, pool.at_best)  # [labelings, runs]
    diff = (scores * ~marks).sum(1) / model - (scores * marks).sum(1) / base
    return np.where(np.maximum(*at_best) <= floor, np.nan, diff)


def permutation_p(pool: _Pool, observed: np.ndarray, floor: float) -> tuple[float, float]:
    """(two-sided p, least reachable p): the statistic recomputed, levels and all, under every
    relabeling of the runs; a relabeling that is not comparable counts as at least as extreme
    (conservative). Two-sided: twice the smaller one-sided p."""
    runs, baseline_runs = len(observed), int(observed.sum())
    stat = float(_differences(pool, observed[None], floor)[0])
    values = _differences(pool, _labelings(runs, baseline_runs, np.random.default_rng(PERMUTATION_SEED)), floor)
    tie = 1e-12 * max(1.0, abs(stat))
    below, above = np.sum(~(values > stat + tie)), np.sum(~(values < stat - tie))  # NaN counts on both sides
    total = len(values)
    if math.comb(runs, baseline_runs) > EXACT_LIMIT:  # Monte Carlo: the observed labelling counts once more
        below, above, total = below + 1, above + 1, total + 1
    return min(1.0, 2 * min(below, above) / total), min(1.0, 2 / math.comb(runs, baseline_runs))


def clopper_pearson_upper(copies: int, samples: int, confidence: float = CONFIDENCE) -> float:
    """The upper end of the two-sided Clopper-Pearson interval for copies / samples (0 of 256: 0.014)."""
    if copies >= samples:
        return 1.0
    return float(scipy.stats.beta.ppf(0.5 + confidence / 2, copies + 1, samples - copies))


def seeds_for_power(effect_sd: float, power: float = POWER, alpha: float = ALPHA, most: int = 100) -> int:
    """Seeds a side for a two-sided two-sample t test at `alpha` to detect a difference of
    `effect_sd` seed-to-seed standard deviations with probability `power` (noncentral t)."""
    for n in range(2, most + 1):
        if power_at(n, n, effect_sd, alpha) >= power:
            return n
    return most


def power_at(model_seeds: int, baseline_seeds: int, effect_sd: float, alpha: float = ALPHA) -> float:
    dof = model_seeds + baseline_seeds - 2
    ncp = effect_sd / math.sqrt(1 / model_seeds + 1 / baseline_seeds)
    crit = scipy.stats.t.ppf(1 - alpha / 2, dof)
    return float(scipy.stats.nct.sf(crit, dof, ncp) + scipy.stats.nct.cdf(-crit, dof, ncp))


# --- the comparison -----------------------------------------------------------------------------

def compare_seeds(model: Sequence[Fit], baseline: Sequence[Fit], floor: float = 0.0,
                  samples: Sequence[int] | None = None, margin: float = EQUIVALENCE_MARGIN) -> SeedComparison:
    """The model's runs (one Fit per seed) against the baseline's at matched quality. `floor`: the
    memorization that means nothing (held-out real images'); `samples`: generated samples a
    checkpoint, per run of model then baseline (for the floors' bounds; default 0: no bound)."""
    pool = _pool([*model, *baseline])
    if isinstance(pool, str):
        return not_comparable(pool, len(model), len(baseline))
    is_base = np.array([False] * len(model) + [True] * len(baseline))
    scores = _scores(pool, is_base, floor)
    if scores is None:
        return not_comparable(NO_COMPARABLE_QUALITY, len(model), len(baseline))
    a, b = scores[~is_base], scores[is_base]
    diff = float(a.mean() - b.mean())
    se, dof = _welch(a, b)
    low, high = _t_interval(diff, se, dof, CONFIDENCE)
    p, p_min = permutation_p(pool, is_base, floor)
    counts = np.zeros(len(scores), int) if samples is None else np.asarray(samples, int)
    bounds = [clopper_pearson_upper(0, int(counts[side].sum())) if counts[side].sum() and not scores[side].any()
              else math.nan for side in (~is_base, is_base)]
    if math.isfinite(bounds[0]) and not math.isfinite(bounds[1]):  # the model at the floor: its bound, not 0 +- 0
        low, high = -_one_side(b, 1), bounds[0] - _one_side(b, 0)
    elif math.isfinite(bounds[1]) and not math.isfinite(bounds[0]):
        low, high = _one_side(a, 0) - bounds[1], _one_side(a, 1)
    return SeedComparison(diff, low, high, p, p_min, equivalence_p(diff, se, dof, margin), tuple(map(float, a)),
                          tuple(map(float, b)), bounds[0], bounds[1], *_relative(a, b, floor), margin=margin)


def _one_side(scores: np.ndarray, upper: int) -> float:
    """The lower (upper=0) or upper (1) end of the t interval of one side's mean (NaN with one seed)."""
    if len(scores) < 2:
        return math.nan
    half = scores.std(ddof=1) / math.sqrt(len(scores)) * scipy.stats.t.ppf(0.5 + CONFIDENCE / 2, len(scores) - 1)
    return float(scores.mean() + (half if upper else -half))


def _relative(a: np.ndarray, b: np.ndarray, floor: float) -> tuple[float, float, float]:
    """(mean(a) - mean(b)) / mean(b) with a delta-method Welch interval (the two means independent);
    NaN where the baseline's mean is at or below the floor, or with one seed a side for the interval."""
    mb = float(b.mean())
    if mb <= max(floor, 0.0):
        return math.nan, math.nan, math.nan
    rel = float(a.mean() / mb - 1.0)
    if len(a) < 2 or len(b) < 2:
        return rel, math.nan, math.nan
    va, vb = a.var(ddof=1) / len(a) / mb ** 2, a.mean() ** 2 * b.var(ddof=1) / len(b) / mb ** 4
    se2 = va + vb
    if se2 == 0:
        return rel, rel, rel
    dof = se2 ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    low, high = _t_interval(rel, math.sqrt(se2), dof, CONFIDENCE)
    return rel, low, high


def word(c: SeedComparison, p: float | None = None, alpha: float = ALPHA) -> str:
    """The verdict in words, read from the comparison with `p` (default c.p; a multiplicity-adjusted
    p for a family of comparisons): better / worse need the interval to exclude 0 and p < alpha;
    indistinguishable needs the equivalence test to pass; a side with no copy is read against its
    bound; one seed a side is no verdict."""
    p = c.p if p is None else p
    at_floor = math.isfinite(c.model_bound), math.isfinite(c.baseline_bound)
    if c.reason == NO_COMPARABLE_QUALITY:  # neither copies more than held-out real images: 0 - 0 is no result
        return BOTH_AT_FLOOR
    if c.reason is not None:
        return NOT_COMPARABLE
    if all(at_floor):
        return BOTH_AT_FLOOR
    if min(c.seeds) < 2:
        return ONE_SEED
    significant = p < alpha
    if at_floor[0]:
        return BELOW_FLOOR_BOUND if significant and c.high < 0 else INCONCLUSIVE
    if significant and c.high < 0:
        return BETTER
    if significant and c.low > 0:
        return WORSE
    # a side at the floor is only known to copy less than its bound: "the same" needs the bound inside the margin
    bounded = all(b < c.margin for b in (c.model_bound, c.baseline_bound) if math.isfinite(b))
    return INDISTINGUISHABLE if c.equivalence_p < alpha and bounded else INCONCLUSIVE


# --- families of comparisons --------------------------------------------------------------------

def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (Holm 1979): family-wise error at most alpha."""
    p = np.asarray(p_values, np.float64)
    order = np.argsort(p)
    adjusted = np.maximum.accumulate([(len(p) - rank) * p[i] for rank, i in enumerate(order)])
    out = np.empty(len(p))
    out[order] = np.minimum(adjusted, 1.0)
    return out.tolist()


def benjamini_hochberg(p_values: Sequence[float]) -> list[float]:
    """Benjamini-Hochberg q-values (Benjamini & Hochberg 1995): false discovery rate at most q."""
    p = np.asarray(p_values, np.float64)
    if not len(p):
        return []
    order = np.argsort(p)
    ranked = p[order] * len(p) / np.arange(1, len(p) + 1)
    q = np.minimum.accumulate(ranked[::-1])[::-1]
    out = np.empty(len(p))
    out[order] = np.minimum(q, 1.0)
    return out.tolist()
