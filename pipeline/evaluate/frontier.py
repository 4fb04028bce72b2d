"""The memorization-quality frontier (docs/method.md#matched-quality).

Memorization and quality both grow with training, so a model that copies less may only be an
earlier point of the baseline's own curve, which stopping the baseline early would give too. This
module compares what a user who may stop at any point of training can get from each model:

1. A fit along training progress (`fit_run`): each run's memorization ratios at its checkpoints
   are fitted non-decreasing over training order by isotonic regression, so that one noisy
   checkpoint does not decide the answer; quality (lower is better, as KID and FD) is fitted
   unimodal: it improves, and may degrade again.
2. The frontier of a run (`Frontier`): at each quality level q, the least fitted memorization of
   the run's curve (checkpoints joined linearly in training order) at quality q or better.
3. The comparison of a model with the baseline over the quality range both reach
   (`matched_difference`): the mean of model frontier - baseline frontier at the baseline's
   checkpoints in that range ("matched"), and the mean difference over the whole range ("area").
   Where neither copies anything anywhere in that range it is "not comparable", never 0 - 0.
   pipeline/compare/verdict.py reads the same comparison per seed, for intervals and verdicts.
4. Bootstrap bands (`resample`, `band`): each run's samples resampled with replacement, the same
   indices at every checkpoint of a run; they show how well a run is measured, on figures only.

Quality is any `QualityFn`: indices into a checkpoint's samples (a resample) -> a float, lower is
better. `KID`, `FD` and `FDInfinity` make one from a checkpoint's feature vectors against fixed
reference features: the unbiased KID of Binkowski et al. 2018, the Frechet distance, and the
Frechet distance extrapolated to infinitely many samples (Chong & Forsyth 2020); FD at a fixed,
small sample count is biased upward, and by an amount that depends on the sample count.

pipeline/compare/matched.py (the first-crossing reading of one model point on the baseline's curve) stays
as it was; this module is meant to replace it as the headline.
"""
from __future__ import annotations

import functools
import warnings
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.optimize import isotonic_regression
from threadpoolctl import threadpool_limits

from pipeline.core.io import atomic_path, unreadable
from pipeline.core.metrics import gaussian, gaussian_frechet_distance

QualityFn = Callable[[np.ndarray], float]  # sample indices (with repeats) -> quality, lower is better
Measure = Callable[[np.ndarray], QualityFn]  # a checkpoint's features -> its QualityFn

NO_COMMON_RANGE = "no common quality range"  # one model's best quality is worse than the other's worst
NO_COMPARABLE_QUALITY = "no comparable quality"  # neither copies anything in the common range: 0 - 0
NO_QUALITY = "quality not finite"  # a measure gave NaN or inf at some checkpoint


# --- data ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Checkpoint:
    """One checkpoint of one run: its training progress (any increasing scale: fraction of the
    run, optimizer steps; only the order is used), whether each generated sample is memorized
    (memorization ratio = mean), and what measures their quality: either per-sample `features`
    (a `Measure` such as KID(reference) turns them into a QualityFn) or a `quality` callable."""
    progress: float
    memorized: np.ndarray
    features: np.ndarray | None = None
    quality: QualityFn | None = None

    def __post_init__(self):
        memorized = np.asarray(self.memorized, bool)
        if memorized.ndim != 1 or len(memorized) < 2:
            raise ValueError("memorized must be one flag per sample, at least two samples")
        if (self.features is None) == (self.quality is None):
            raise ValueError("give a checkpoint either features or a quality callable")
        if self.features is not None and len(self.features) != len(memorized):
            raise ValueError(f"{len(self.features)} feature rows for {len(memorized)} samples")
        object.__setattr__(self, "memorized", memorized)

    def quality_fn(self, measure: Measure | None) -> QualityFn:
        if self.quality is not None:
            return self.quality
        if measure is None:
            raise ValueError("checkpoints given as features need a measure (KID, FD, FDInfinity)")
        return measure(np.asarray(self.features, np.float64))


@dataclass(frozen=True)
class Run:
    """One training run (one seed) of a model: its checkpoints, kept in training order."""
    checkpoints: tuple[Checkpoint, ...]

    def __post_init__(self):
        ordered = tuple(sorted(self.checkpoints, key=lambda c: c.progress))
        if len(ordered) < 1 or len({c.progress for c in ordered}) != len(ordered):
            raise ValueError("a run needs checkpoints with distinct progress values")
        object.__setattr__(self, "checkpoints", ordered)


@dataclass(frozen=True)
class Curve:
    """One model's checkpoints as the evaluate stage measures them (its curve.npz): training
    progress in rounds [C], whether each generated sample is memorized [C, n] (NN1/NN2 ratio below
    metrics.MEMORIZED_RATIO), the samples' features [C, n, d], the real pool's features [P, d] (the
    quality reference) and whether each held-out real image passes the same test [H] (what
    memorization means nothing below: the floor)."""
    progress: np.ndarray
    memorized: np.ndarray
    features: np.ndarray
    reference: np.ndarray
    heldout_memorized: np.ndarray

    FIELDS = ("progress", "memorized", "features", "reference", "heldout_memorized")

    def save(self, path) -> None:
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez_compressed(f, **{name: getattr(self, name) for name in self.FIELDS})

    @classmethod
    def load(cls, path) -> "Curve":
        if not Path(path).is_file():
            raise FileNotFoundError(f"{path}: no curve (run the evaluate stage)")
        try:
            with np.load(path) as z:
                return cls(**{name: z[name] for name in cls.FIELDS})
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:  # truncated, or not this format
            raise unreadable(path, e) from None

    @classmethod
    def empty(cls) -> "Curve":
        """No checkpoint measured (eval.curve_samples 0)."""
        return cls(*(np.zeros((0,) * ndim) for ndim in (1, 2, 3, 2, 1)))

    @property
    def floor(self) -> float:
        return float(np.mean(self.heldout_memorized)) if len(self.heldout_memorized) else 0.0

    def run(self) -> Run:
        return Run(tuple(Checkpoint(float(g), m, features=f)
                         for g, m, f in zip(self.progress, self.memorized, self.features)))


# --- quality measures ---------------------------------------------------------------------------

def polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """k(x, y) = (x.y / d + 1)^3, the KID kernel (Binkowski et al. 2018, "Demystifying MMD GANs")."""
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def _kernel_row_means(x: np.ndarray, y: np.ndarray, block: int = 2048) -> np.ndarray:
    """Mean of k(x_i, y_j) over j for every i, in blocks of y: a large reference set never needs
    its whole kernel matrix in memory."""
    total = np.zeros(len(x))
    for start in range(0, len(y), block):
        total += polynomial_kernel(x, y[start:start + block]).sum(1)
    return total / len(y)


class KID:
    """Unbiased KID (Binkowski et al. 2018): MMD^2 with the cubic polynomial kernel, each within-set
    mean over pairs of distinct samples (the U-statistic), the cross term over all pairs.

    On a resample (indices with repeats) the within-set mean is over pairs of distinct original
    samples, weighted by how often each was drawn: a sample paired with its own copy would add
    k(x, x) and bias the estimate upward, so the bootstrap distribution is centred on the estimate
    itself. The reference term is computed once per reference; a checkpoint's kernel matrix once
    per checkpoint, so a resample costs one quadratic form. That matrix is n x n doubles: right
    for curve checkpoints (hundreds to a few thousand samples), not for a 65,536-sample final
    evaluation (34 GB), which would need subsets (metrics.kernel_inception_distance)."""

    def __init__(self, reference: np.ndarray):
        self.reference = np.asarray(reference, np.float64)
        if len(self.reference) < 2:
            raise ValueError("KID needs at least two reference samples")
        y, r = self.reference, len(self.reference)
        self_kernel = (np.einsum("ij,ij->i", y, y) / y.shape[1] + 1.0) ** 3  # k(y_i, y_i), left out
        self._within_reference = (_kernel_row_means(y, y).sum() * r - self_kernel.sum()) / (r * (r - 1))

    def __call__(self, features: np.ndarray) -> QualityFn:
        x = np.asarray(features, np.float64)
        k_xx = polynomial_kernel(x, x)
        cross = _kernel_row_means(x, self.reference)
        diagonal = np.diag(k_xx).copy()

        def quality(indices: np.ndarray) -> float:
            w = np.bincount(indices, minlength=len(x)).astype(np.float64)
            pairs = w.sum() ** 2 - w @ w  # ordered pairs of distinct original samples
            if pairs <= 0:
                return float("nan")
            within = (w @ k_xx @ w - diagonal @ (w * w)) / pairs
            return float(within + self._within_reference - 2.0 * (w @ cross) / w.sum())
        return quality


def kid(features: np.ndarray, reference: np.ndarray) -> float:
    """The unbiased KID of `features` against `reference` (see KID)."""
    return KID(reference)(features)(np.arange(len(features)))


def fd_infinity(features: np.ndarray, reference: np.ndarray, fractions: Sequence[float] = (0.2, 0.4, 0.6, 0.8, 1.0),
                repeats: int = 2, rng: np.random.Generator | None = None) -> float:
    """FD extrapolated to infinitely many samples (Chong & Forsyth 2020, "Effectively Unbiased FID
    and Inception Score and where to find them"): FD of random subsets of several sizes N against
    the fixed reference, a least-squares line FD = a + b / N, and its intercept a. FD's bias is
    close to linear in 1/N, so a is the FD free of the sample count; its variance is larger
    than that of the FD of all samples. Subsets of size < len(features) are drawn `repeats` times."""
    x = np.asarray(features, np.float64)
    rng = np.random.default_rng(0) if rng is None else rng
    sizes = np.unique(np.round(np.asarray(fractions) * len(x)).astype(int))
    sizes = sizes[(sizes >= 2) & (sizes <= len(x))]
    if len(sizes) < 2:
        raise ValueError(f"FD at {len(x)} samples gives fewer than two subset sizes to extrapolate from")
    inverse, fd, fitted = [], [], gaussian(reference)
    for size in sizes:
        for _ in range(1 if size == len(x) else repeats):  # the full set is the same every time
            inverse.append(1.0 / size)
            fd.append(gaussian_frechet_distance(gaussian(x[rng.choice(len(x), size, replace=False)]), fitted))
    _, intercept = np.polyfit(inverse, fd, 1)
    return float(intercept)


@dataclass(frozen=True)
class FD:
    """The Frechet distance (pipeline.core.metrics.frechet_distance) of a resample against fixed
    reference features. Biased upward at small sample counts: use it at equal counts only. On a
    bootstrap resample (about 63% distinct samples) it is biased a little further, so its bootstrap
    distribution sits above the estimate; the comparison uses quality only to order and match
    checkpoints, which a shift shared by every checkpoint of both models does not change. KID's
    bootstrap distribution is centred on its estimate (see KID)."""
    reference: np.ndarray

    @functools.cached_property
    def _reference(self) -> tuple[np.ndarray, np.ndarray]:
        return gaussian(self.reference)  # once: every resample of every checkpoint is measured against it

    def __call__(self, features: np.ndarray) -> QualityFn:
        return lambda indices: gaussian_frechet_distance(gaussian(features[indices]), self._reference)


@dataclass(frozen=True)
class FDInfinity:
    """fd_infinity of a resample against fixed reference features; `seed` makes the subset draws
    reproducible (one generator per checkpoint, drawn in a fixed order). On a bootstrap resample
    the extrapolation reaches the FD of the checkpoint's own samples, the bootstrap's population,
    not of the model's: like FD's (see FD), its bootstrap distribution sits that 1 / n bias above
    the estimate."""
    reference: np.ndarray
    fractions: Sequence[float] = (0.2, 0.4, 0.6, 0.8, 1.0)
    repeats: int = 2
    seed: int = 0

    def __call__(self, features: np.ndarray) -> QualityFn:
        rng = np.random.default_rng(self.seed)
        return lambda indices: fd_infinity(features[indices], self.reference, self.fractions, self.repeats, rng)


# --- fits and frontiers -------------------------------------------------------------------------

@dataclass(frozen=True)
class Frontier:
    """The least memorization a user can get at quality q or better by stopping one run early:
    the least memorization on the run's curve (its checkpoints in training order joined by straight
    lines: stopping between two checkpoints) over the points whose quality is q or better.

    Memorization is fitted non-decreasing in training order, quality unimodal (fit_run). Where
    quality only improves, the least-memorizing point at quality q is the first one reaching
    it. Where it improves and then degrades (fine-tuning: the baseline's samples get worse as it
    starts copying), the degraded late checkpoints add nothing a user would stop at, so the frontier
    is that of the run stopped at its best checkpoint (why quality is not fitted monotone: fit_run).
    frontier(q) is non-increasing in q,
    memorization[0] for every q worse than the first checkpoint (`worst`), undefined (NaN) for q
    better than the run ever gets (`best`).
    Linear, not a step function at the checkpoints: a step would read a model whose checkpoint
    lands just short of the baseline's quality at its next checkpoint, a bias of half a
    checkpoint's memorization increment against whichever model is read between checkpoints
    (tests/test_frontier.py: a step called 29 of 100 null pairs worse or better, this 6 of 100)."""
    quality: np.ndarray
    memorization: np.ndarray

    def __post_init__(self):
        # the least memorization of a segment lies at its earlier end only on a fitted curve
        if np.any(np.diff(self.memorization) < 0):
            raise ValueError("a frontier needs memorization non-decreasing in training order: fit it first (fit_run)")

    @property
    def best(self) -> float:
        return float(np.min(self.quality))  # NaN if a measure failed anywhere

    @property
    def worst(self) -> float:
        return float(self.quality[0])

    def __call__(self, q, left: bool = False) -> np.ndarray:
        """frontier(q); left=True: its limit from better qualities (q - 0), the infimum over points
        of quality strictly better than q, where the frontier jumps (a flat stretch of quality, a
        checkpoint better than both neighbours)."""
        q = np.asarray(q, np.float64)
        if len(self.quality) == 1:
            reached = self.quality[0] < q if left else self.quality[0] <= q
            return np.where(reached, self.memorization[0], np.nan)
        qa, qb = self.quality[:-1], self.quality[1:]
        ma, mb = self.memorization[:-1], self.memorization[1:]
        qq = q[..., None]
        start = qa < qq if left else qa <= qq  # the segment's least-memorizing end is reached
        crosses = (qb < qq if left else qb <= qq) & ~start  # only its later part is: from where it crosses q
        with np.errstate(invalid="ignore", divide="ignore"):
            crossing = ma + (qa - qq) / (qa - qb) * (mb - ma)
        value = np.where(start, ma, np.where(crosses, crossing, np.inf)).min(-1)
        return np.where(np.isinf(value), np.nan, value)

    def _lines(self) -> tuple[np.ndarray, np.ndarray]:
        """Every piece the frontier is made of as a line m = a + b q: each checkpoint's memorization
        (b = 0) and each segment's crossing."""
        qa, qb = self.quality[:-1], self.quality[1:]
        ma, mb = self.memorization[:-1], self.memorization[1:]
        sloped = qa != qb
        slope = -(mb - ma)[sloped] / (qa - qb)[sloped]
        intercept = ma[sloped] - slope * qa[sloped]
        return (np.concatenate([self.memorization, intercept]),
                np.concatenate([np.zeros(len(self.memorization)), slope]))

    def mean_over(self, best: float, worst: float) -> float:
        """The mean of frontier(q) over q in [best, worst], exactly: between the checkpoints' quality
        levels and the points where two of its lines cross it is linear, so the trapezoid rule on
        those points (right value at a piece's start, left limit at its end) integrates it."""
        if worst <= best:
            return float(self(best))
        intercept, slope = self._lines()
        with np.errstate(invalid="ignore", divide="ignore"):
            crossings = (intercept[:, None] - intercept[None, :]) / (slope[None, :] - slope[:, None])
        q = np.concatenate([[best, worst], self.quality, crossings[np.isfinite(crossings)]])
        q = np.unique(q[(q >= best) & (q <= worst)])
        pieces = np.diff(q) * (self(q[:-1]) + self(q[1:], left=True)) / 2.0
        return float(pieces.sum() / (worst - best))


@dataclass(frozen=True)
class Fit:
    """One run's fits in training order (fit_run), with the values they were fitted to (a report
    can show how far the data are from the fits' shapes)."""
    memorization: np.ndarray
    quality: np.ndarray
    raw_memorization: np.ndarray
    raw_quality: np.ndarray

    @property
    def frontier(self) -> Frontier:
        return Frontier(self.quality, self.memorization)


def unimodal_fit(values) -> np.ndarray:
    """The least-squares fit that first does not increase and then does not decrease (a valley:
    quality that improves and may degrade again), over every split of the sequence into a
    non-increasing isotonic fit before and a non-decreasing one after (Stout 2008, "Unimodal
    regression via prefix isotonic regression"; a non-increasing sequence followed by a
    non-decreasing one is a valley wherever they meet). NaN anywhere gives NaN everywhere."""
    values = np.asarray(values, np.float64)
    if not np.isfinite(values).all():
        return np.full(len(values), np.nan)
    fits = [np.concatenate([isotonic_regression(values[:k], increasing=False).x if k else [],
                            isotonic_regression(values[k:], increasing=True).x if k < len(values) else []])
            for k in range(len(values) + 1)]
    return min(fits, key=lambda fit: float(np.sum((fit - values) ** 2)))


def fit_run(memorization, quality, samples=None) -> Fit:
    """A run's checkpoints fitted in training order by isotonic regression, the least-squares
    monotone fit, pool adjacent violators (Ayer et al. 1955; Barlow et al. 1972, "Statistical
    Inference under Order Restrictions"; scipy.optimize.isotonic_regression): one noisy checkpoint
    is pooled with its neighbours instead of deciding the frontier alone, and moves the fit's mean by
    its share, no more.

    Memorization is fitted non-decreasing, weighted by each checkpoint's sample count (`samples`), so
    a pooled block's value is the memorization ratio of all its samples. Where it clearly falls (a
    mitigation acting late) the fit pools the fall into a plateau at its mean: the frontier then
    credits the mitigation less than its late checkpoints would, never more.

    Quality is fitted unimodal (`unimodal_fit`: improving, then possibly degrading), not monotone: a
    fine-tuned baseline's samples get worse as it starts copying, and a monotone fit pooled those
    late checkpoints with its good early ones into a plateau no checkpoint had, which left the
    fine-tuning regime with no quality in common between the baseline and any mitigation
    (docs/history.md). Fitted rather than read raw, a stretch where quality holds flat is pooled,
    so the frontier is not decided by whichever of its checkpoints drew the luckiest samples."""
    mem = np.asarray(memorization, np.float64)
    weights = None if samples is None else np.asarray(samples, np.float64)
    fitted = isotonic_regression(mem, weights=weights, increasing=True).x
    return Fit(fitted, unimodal_fit(quality), mem, np.asarray(quality, np.float64))


# --- comparison ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Matched:
    """model - baseline memorization at matched quality over the quality range all their runs reach,
    [best, worst]; `matched`: mean over the baseline's fitted checkpoint qualities in the range,
    `area`: mean over the whole range (the area between the frontiers / the range's width). Both
    NaN, and `reason` set, when not comparable. `baseline_copies`: the baseline's frontier at
    `best`, the most it copies in the range. `relative`: `matched` over the baseline's own mean
    memorization at those qualities (-0.5: half the baseline's copying), NaN where that is 0."""
    matched: float
    area: float
    best: float
    worst: float
    baseline_copies: float
    reason: str | None = None
    relative: float = np.nan


def _mean_frontier(frontiers: Sequence[Frontier], q) -> np.ndarray:
    """A model's frontier over seeds: the mean of its runs' frontiers (the expected memorization of
    a run, of a seed drawn at random, stopped at quality q)."""
    return np.mean([f(q) for f in frontiers], axis=0)


def matched_difference(model: Sequence[Frontier], baseline: Sequence[Frontier], floor: float = 0.0) -> Matched:
    """Compare a model's frontiers (one per run) with the baseline's over the quality range every
    run reaches. Not comparable (never 0 - 0): when that range is empty, or when neither frontier
    exceeds `floor` anywhere in it (both are largest at its best end). A model that copies where
    the baseline does not is compared: that is a real "worse". `floor`: memorization that means
    nothing, e.g. the held-out reference's memorization ratio (real images never trained on)."""
    frontiers = (*model, *baseline)
    best, worst = max(f.best for f in frontiers), min(f.worst for f in frontiers)
    if not all(np.isfinite(f.quality).all() for f in frontiers):  # a measure failed on a resample
        return Matched(np.nan, np.nan, np.nan, np.nan, np.nan, NO_QUALITY)
    if best > worst:
        return Matched(np.nan, np.nan, best, worst, np.nan, NO_COMMON_RANGE)
    copies = float(_mean_frontier(baseline, best))
    if max(copies, float(_mean_frontier(model, best))) <= floor:
        return Matched(np.nan, np.nan, best, worst, copies, NO_COMPARABLE_QUALITY)
    levels = np.concatenate([f.quality for f in baseline])
    levels = levels[(levels >= best) & (levels <= worst)]
    if not len(levels):  # the range lies between two baseline checkpoints
        levels = np.array([best])
    copied = _mean_frontier(baseline, levels)
    matched = float(np.mean(_mean_frontier(model, levels) - copied))
    reference = float(np.mean(copied))
    area = float(np.mean([f.mean_over(best, worst) for f in model])
                 - np.mean([f.mean_over(best, worst) for f in baseline]))
    return Matched(matched, area, best, worst, copies, relative=matched / reference if reference > 0 else np.nan)


# --- bootstrap: bands, not verdicts -------------------------------------------------------------

@dataclass(frozen=True)
class Resampled:
    """A model's runs fitted on all their samples (`point`, one Fit per run) and on each bootstrap
    resample (`replicates[run][b]`)."""
    point: tuple[Fit, ...]
    replicates: tuple[tuple[Fit, ...], ...]


def _run_values(run: Run, measure: Measure | None, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """[checkpoints, resamples + 1, 2]: (memorization ratio, quality) of each checkpoint on all its
    samples, then on each resample with replacement. One resample draws the same sample indices at
    every checkpoint of the run: the evaluation samples every checkpoint from the same noise
    (seeds.eval), so the i-th samples of two checkpoints share their noise and their errors; drawn
    independently per checkpoint, that shared noise would average out of the fit and the band would
    be too narrow. Memorization and quality come from the same indices too."""
    counts = {len(c.memorized) for c in run.checkpoints}
    if len(counts) != 1:
        raise ValueError(f"a run's checkpoints need the same sample count to be resampled together (got {sorted(counts)})")
    n = counts.pop()
    draws = [np.arange(n)] + [rng.integers(0, n, n) for _ in range(resamples)]
    values = []
    for checkpoint in run.checkpoints:
        quality = checkpoint.quality_fn(measure)  # built here and dropped after: one kernel at a time
        values.append([(checkpoint.memorized[i].mean(), quality(i)) for i in draws])
    return np.array(values)


def resample(runs: Sequence[Run], measure: Measure | None = None, resamples: int = 200,
             seed: int | np.random.SeedSequence = 0) -> Resampled:
    """Measure and fit every run of one model on its samples and on `resamples` bootstrap
    resamples of its samples (Efron & Tibshirani 1993), seeded: what a figure's band shows of how
    well each run is measured. It says nothing of how another training seed would come out, so
    verdicts read per-seed scores instead (pipeline/compare/verdict.py)."""
    if not runs:
        raise ValueError("a model needs at least one run")
    rng = np.random.default_rng(seed)
    point, replicates = [], []
    for run in runs:
        # One BLAS thread: the resamples' matrices are small (256 x 64 features here), and threads
        # beside a training process made each covariance 50x slower on 2 cores (results.md, Benchmarks).
        with threadpool_limits(limits=1, user_api="blas"):
            values = np.swapaxes(_run_values(run, measure, resamples, rng), 0, 1)
        samples = [len(c.memorized) for c in run.checkpoints]
        fits = [fit_run(v[:, 0], v[:, 1], samples) for v in values]
        point.append(fits[0])
        replicates.append(tuple(fits[1:]))
    return Resampled(tuple(point), tuple(replicates))


def point_fits(runs: Sequence[Run], measure: Measure | None = None) -> list[Fit]:
    """Every run measured on all its samples and fitted (no resampling): what a verdict reads."""
    return list(resample(runs, measure, resamples=0).point)


def _replicate(model: Resampled, b: int, rng: np.random.Generator) -> list[Frontier]:
    """Replicate b's frontiers: the runs (seeds) drawn with replacement; the j-th run drawn takes its
    sample resample (b + j), so a seed drawn twice gets two different ones."""
    runs, count = len(model.replicates), len(model.replicates[0])
    return [model.replicates[s][(b + j) % count].frontier for j, s in enumerate(rng.integers(0, runs, runs))]


def resample_models(models: Mapping[str, Sequence[Run]], measure: Measure | None = None, resamples: int = 200,
                    seed: int = 0) -> dict[str, Resampled]:
    """Every model resampled, each seeded by `seed` and its name (so adding or reordering models
    changes no other model's band)."""
    out = {}
    for name, runs in models.items():
        key = int.from_bytes(name.encode(), "little")  # stable across processes, unlike hash()
        out[name] = resample(runs, measure, resamples, np.random.SeedSequence([seed, 1, key]))
    return out


def band(model: Resampled, levels: np.ndarray, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Pointwise percentile interval of the model's frontier (mean over its seeds) at each quality
    level, over its bootstrap replicates (seeds drawn as in the comparison, seeded): what a
    figure shades around the frontier. NaN where fewer than half the replicates reach a level."""
    rng = np.random.default_rng(0)
    values = np.array([_mean_frontier(_replicate(model, b, rng), levels) for b in range(len(model.replicates[0]))])
    tail = (1.0 - level) / 2.0
    enough = np.isfinite(values).mean(0) >= 0.5
    with warnings.catch_warnings():  # levels no replicate reaches: NaN, as meant
        warnings.simplefilter("ignore", RuntimeWarning)
        low, high = (np.nanquantile(values, q, axis=0) for q in (tail, 1.0 - tail))
    return np.where(enough, low, np.nan), np.where(enough, high, np.nan)
