"""The memorization-quality frontier (method.md, "Matched quality"; issue 22).

Memorization and quality both grow with training, so a model that copies less may only be an
earlier point of the baseline's own curve, which stopping the baseline early would give too. This
module compares what a user who may stop at any point of training can get from each model:

1. Fits along training progress (`fit_run`): each run's memorization ratio and quality at its
   checkpoints are fitted monotone over training order by isotonic regression (memorization
   non-decreasing, quality improving: lower is better, as KID and FD), so that one noisy checkpoint
   does not decide the answer.
2. The frontier of a run (`Frontier`): at each quality level q, the least fitted memorization of
   the fitted curve (checkpoints joined linearly in training order) at quality q or better.
3. The comparison of a model with the baseline over the quality range both reach
   (`matched_difference`): the mean of model frontier - baseline frontier at the baseline's
   checkpoints in that range ("matched"), and the mean difference over the whole range ("area").
   Where neither copies anything anywhere in that range it is "not comparable", never 0 - 0.
4. 95% percentile bootstrap intervals (`resample`, `compare`): each checkpoint's generated samples
   resampled with replacement (memorization and quality from the same resample), refitted; seeds
   resampled too when a model has several.
5. A verdict (`verdict`): better, worse, indistinguishable, not comparable.

Quality is any `QualityFn`: indices into a checkpoint's samples (a resample) -> a float, lower is
better. `KID`, `FD` and `FDInfinity` make one from a checkpoint's feature vectors against fixed
reference features: the unbiased KID of Binkowski et al. 2018, the Frechet distance, and the
Frechet distance extrapolated to infinitely many samples (Chong & Forsyth 2020); FD at a fixed,
small sample count is biased upward, and by an amount that depends on the sample count.

pipeline/matched.py (the first-crossing reading of one model point on the baseline's curve) stays
as it was; this module is meant to replace it as the headline.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from pipeline.metrics import frechet_distance

QualityFn = Callable[[np.ndarray], float]  # sample indices (with repeats) -> quality, lower is better
Measure = Callable[[np.ndarray], QualityFn]  # a checkpoint's features -> its QualityFn

BETTER, WORSE, INDISTINGUISHABLE, NOT_COMPARABLE = "better", "worse", "indistinguishable", "not comparable"
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
    per checkpoint, so a resample costs one quadratic form."""

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
    inverse, fd = [], []
    for size in sizes:
        for _ in range(1 if size == len(x) else repeats):  # the full set is the same every time
            inverse.append(1.0 / size)
            fd.append(frechet_distance(x[rng.choice(len(x), size, replace=False)], reference))
    _, intercept = np.polyfit(inverse, fd, 1)
    return float(intercept)


@dataclass(frozen=True)
class FD:
    """The Frechet distance (pipeline.metrics.frechet_distance) of a resample against fixed
    reference features. Biased upward at small sample counts: use it at equal counts only. On a
    bootstrap resample (about 63% distinct samples) it is biased a little further, so its bootstrap
    distribution sits above the estimate; the comparison uses quality only to order and match
    checkpoints, which a shift shared by every checkpoint of both models does not change. KID's
    bootstrap distribution is centred on its estimate (see KID)."""
    reference: np.ndarray

    def __call__(self, features: np.ndarray) -> QualityFn:
        return lambda indices: frechet_distance(features[indices], self.reference)


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

