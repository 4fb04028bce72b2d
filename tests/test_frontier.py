"""The memorization-quality frontier protocol (pipeline/evaluate/frontier.py, docs/method.md#matched-quality) on synthetic runs with a known
answer: frontiers by hand, the isotonic fits, KID and extrapolated FD against their definitions,
and the seed-level verdicts (pipeline/compare/verdict.py) for a model that copies less at equal quality,
one that only trains less, one compared with a degrading baseline, and one whose curve crosses
the baseline's."""
import numpy as np
import pytest

from pipeline.evaluate import frontier as F
from pipeline.compare import verdict as V
from pipeline.core.metrics import frechet_distance, kernel_inception_distance

DIM = 8
PROGRESS = np.linspace(0.1, 1.0, 10)  # ten checkpoints, a fraction of the run each
REFERENCE = np.random.default_rng(12345).normal(size=(800, DIM))  # "real" features: N(0, I)
KID_OF_REFERENCE = F.KID(REFERENCE)  # one reference term for every test


def copies(slope=0.3, offset=0.1):
    return lambda t: np.clip(offset + slope * t, 0.0, 1.0)


def kid_run(rng, memorization, progress=PROGRESS, n=240, shift=lambda t: 1.5 * (1.1 - t)):
    """A run whose samples are N(shift(t) e_1, I) (quality improves with training as the shift shrinks)
    and memorized with probability memorization(t): the same generator for every model, so equal
    progress means equal quality in distribution."""
    checkpoints = []
    for t in progress:
        features = rng.normal(size=(n, DIM))
        features[:, 0] += shift(t)
        checkpoints.append(F.Checkpoint(t, rng.random(n) < memorization(t), features=features))
    return F.Run(tuple(checkpoints))


def scalar_run(rng, memorization, progress=PROGRESS, n=240):
    """The same with a scalar per-sample quality score through the `quality` callable: its mean over
    a resample, linear in progress (10 * (1.1 - t), noise sd 1 per sample)."""
    checkpoints = []
    for t in progress:
        score = 10.0 * (1.1 - t) + rng.normal(size=n)
        checkpoints.append(F.Checkpoint(t, rng.random(n) < memorization(t),
                                        quality=lambda i, s=score: float(s[i].mean())))
    return F.Run(tuple(checkpoints))


# --- frontiers and fits by hand -----------------------------------------------------------------

def hand_frontier():
    # training order: quality 10 -> 6 -> 6 -> 2 (flat between the 2nd and 3rd), memorization rising
    return F.Frontier(np.array([10.0, 6.0, 6.0, 2.0]), np.array([0.0, 0.2, 0.3, 0.5]))


def test_frontier_is_the_first_point_of_the_fitted_curve_at_that_quality():
    f = hand_frontier()
    assert f(12.0) == 0.0 and f(10.0) == 0.0                 # worse than the first checkpoint: stop there
    assert f(8.0) == pytest.approx(0.1)                      # halfway between checkpoints 1 and 2
    assert f(6.0) == pytest.approx(0.2)                      # the first of the flat stretch reaches 6
    assert f(6.0, left=True) == pytest.approx(0.3)           # just better than 6 needs the last of it
    assert f(4.0) == pytest.approx(0.4) and f(2.0) == pytest.approx(0.5)
    assert np.isnan(f(1.0))                                  # better than the run ever gets
    assert (f.best, f.worst) == (2.0, 10.0)
    # the area: [2, 6] from 0.5 to 0.3, [6, 10] from 0.2 to 0.0, so (1.6 + 0.4) / 8
    assert f.mean_over(2.0, 10.0) == pytest.approx(0.25)
    assert f.mean_over(7.0, 9.0) == pytest.approx(np.mean([f(7.0), f(9.0)]))  # one linear piece


def test_memorization_is_fitted_monotone_and_quality_unimodal():
    fit = F.fit_run([0.1, 0.3, 0.2, 0.4], [9.0, 5.0, 7.0, 1.0])
    assert fit.memorization == pytest.approx([0.1, 0.25, 0.25, 0.4])  # the violation pooled
    assert fit.quality == pytest.approx([9.0, 6.0, 6.0, 1.0])  # improving throughout: pooled the same
    assert fit.raw_memorization == pytest.approx([0.1, 0.3, 0.2, 0.4])
    assert fit.raw_quality == pytest.approx([9.0, 5.0, 7.0, 1.0])
    # improving, then degrading: the valley is kept, the noise on either side pooled
    assert F.unimodal_fit([9.0, 4.0, 5.0, 2.0, 6.0, 5.0, 8.0]) == pytest.approx([9.0, 4.5, 4.5, 2.0, 5.5, 5.5, 8.0])
    assert np.isnan(F.unimodal_fit([3.0, np.nan, 1.0])).all()
    weighted = F.fit_run([0.3, 0.2], [2.0, 1.0], samples=[100, 300])  # pooled ratio of all 400 samples
    assert weighted.memorization == pytest.approx([0.225, 0.225])
    with pytest.raises(ValueError, match="fit it first"):
        F.Frontier(np.array([9.0, 5.0, 7.0, 1.0]), np.array([0.1, 0.3, 0.2, 0.4]))


def test_checkpoints_after_the_best_quality_change_nothing_a_user_would_stop_at():
    """Quality improves to 2 and then degrades while memorization keeps rising (a fine-tuned
    baseline that starts copying): the frontier is that of the run stopped at its best checkpoint.
    The monotone quality fit this replaced pooled the last three checkpoints into a plateau at
    quality 5.67: the fitted run never got better than 5.67, though its second checkpoint measured
    2, and a model that reached only 5 had no quality in common with it (docs/history.md)."""
    stopped = F.Frontier(np.array([10.0, 2.0]), np.array([0.0, 0.3]))
    degrading = F.Frontier(np.array([10.0, 2.0, 6.0, 9.0]), np.array([0.0, 0.3, 0.5, 0.6]))
    levels = np.array([2.0, 3.0, 5.5, 6.0, 8.0, 9.0, 10.0, 11.0])
    assert degrading(levels) == pytest.approx(stopped(levels))
    assert degrading(levels, left=True) == pytest.approx(stopped(levels, left=True), nan_ok=True)
    assert (degrading.best, degrading.worst) == (2.0, 10.0)
    assert degrading.mean_over(2.0, 10.0) == pytest.approx(stopped.mean_over(2.0, 10.0)) == pytest.approx(0.15)
    # a late checkpoint better than both neighbours is where a user stops: the frontier jumps to it
    dip = F.Frontier(np.array([10.0, 8.0, 4.0, 9.0]), np.array([0.0, 0.1, 0.2, 0.2]))
    assert dip(4.0) == pytest.approx(0.2) and np.isnan(dip(4.0, left=True)) and np.isnan(dip(3.0))
    # two pieces crossing between checkpoint levels: the mean is exact there too
    crossing = F.Frontier(np.array([10.0, 2.0, 9.0, 1.0]), np.array([0.0, 0.4, 0.4, 0.5]))
    grid = np.linspace(1.0, 10.0, 90001)
    assert crossing.mean_over(1.0, 10.0) == pytest.approx(np.trapezoid(crossing(grid), grid) / 9.0, abs=1e-6)


def test_one_outlier_checkpoint_moves_the_answer_by_its_share_only():
    """(vi) One late checkpoint of a model identical to the baseline reports memorization 0 (say a
    broken evaluation). Read without the fit (least raw memorization at quality q or better), it
    sets the model's frontier to 0 at every quality worse than its own: -0.15 on the mean. Fitted,
    it is pooled with its neighbours, which keeps the sum, so the mean moves by its size / 10."""
    quality = 10.0 - np.arange(10.0)
    memorization = 0.05 + 0.04 * np.arange(10.0)
    glitched = memorization.copy()
    glitched[7] = 0.0
    baseline = [F.fit_run(memorization, quality).frontier]
    clean = F.matched_difference([F.fit_run(memorization, quality).frontier], baseline)
    fitted = F.matched_difference([F.fit_run(glitched, quality).frontier], baseline)
    raw = np.mean([glitched[quality <= q].min() - m for q, m in zip(quality, memorization)])
    assert clean.matched == pytest.approx(0.0, abs=1e-12)
    assert fitted.matched == pytest.approx(-memorization[7] / 10)
    assert raw == pytest.approx(-0.152) and abs(raw) > 4 * abs(fitted.matched)


def test_relative_difference_is_the_share_of_the_baselines_copying_at_matched_quality():
    """What a "46.7% less memorization" claim reads: a model copying half the baseline's rate at
    every quality is -0.5; the relative number is the matched difference over the baseline's own
    memorization at the same checkpoints, and undefined where the baseline copies nothing."""
    base = hand_frontier()
    half = F.matched_difference([F.Frontier(base.quality, base.memorization * 0.5)], [base])
    assert half.relative == pytest.approx(-0.5)
    lower = F.matched_difference([F.Frontier(base.quality, base.memorization - 0.1)], [base])
    assert lower.relative == pytest.approx(-0.1 / np.mean(base(base.quality)))
    assert lower.relative == pytest.approx(-0.1 / ((0.0 + 0.2 + 0.2 + 0.5) / 4))
    silent = F.Frontier(np.array([10.0, 2.0]), np.array([0.0, 0.0]))
    copying = F.matched_difference([F.Frontier(np.array([10.0, 2.0]), np.array([0.1, 0.2]))], [silent])
    assert copying.reason is None and np.isnan(copying.relative)


def test_matched_difference_by_hand_and_when_not_comparable():
    base = hand_frontier()
    lower = F.Frontier(base.quality, base.memorization - 0.1)
    out = F.matched_difference([lower], [base])
    assert (out.matched, out.area, out.best, out.worst) == (pytest.approx(-0.1), pytest.approx(-0.1), 2.0, 10.0)
    assert out.reason is None and out.baseline_copies == pytest.approx(0.5)
    # a model worse than the baseline's first checkpoint everywhere: nothing in common
    far = F.matched_difference([F.Frontier(np.array([30.0, 20.0]), np.array([0.0, 0.0]))], [base])
    assert far.reason == F.NO_COMMON_RANGE and np.isnan(far.matched)
    # a model that stops at quality 10, where neither copies: 0 - 0 is not a result
    early = F.Frontier(np.array([12.0, 10.0]), np.array([0.0, 0.0]))
    assert F.matched_difference([early], [base]).reason == F.NO_COMPARABLE_QUALITY
    # ... but a model that copies where the baseline does not is worse, not incomparable
    copying = F.matched_difference([F.Frontier(np.array([12.0, 10.0]), np.array([0.2, 0.3]))], [base])
    assert copying.reason is None and copying.matched == pytest.approx(0.3)
    # a quality that failed to measure compares nothing
    unmeasured = F.Frontier(np.array([np.nan, 4.0]), np.array([0.1, 0.2]))
    assert F.matched_difference([unmeasured], [base]).reason == F.NO_QUALITY
    # below the floor counts as nothing
    assert F.matched_difference([base], [base], floor=0.6).reason == F.NO_COMPARABLE_QUALITY


# --- quality measures ---------------------------------------------------------------------------

def test_kid_is_unbiased_and_fd_is_not():
    """(v) Two sets of 40 from the same Gaussian, 300 times: KID's mean is 0 within 3 standard
    errors; FD's is far above 0 (it is >= 0 for every draw and grows as 1 / N)."""
    rng = np.random.default_rng(0)
    kids, fds = [], []
    for _ in range(300):
        a, b = rng.normal(size=(40, DIM)), rng.normal(size=(40, DIM))
        kids.append(F.kid(a, b))
        fds.append(frechet_distance(a, b))
    kids, fds = np.array(kids), np.array(fds)
    assert abs(kids.mean()) < 3 * kids.std() / np.sqrt(len(kids))
    assert fds.mean() > 20 * fds.std() / np.sqrt(len(fds))


def test_kid_agrees_with_the_project_kid_and_skips_self_pairs_on_a_resample():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(30, DIM)) + 0.3, rng.normal(size=(30, DIM))
    assert F.kid(x, y) == pytest.approx(kernel_inception_distance(x, y, subsets=1, subset_size=30))
    # a resample with repeats: the within-set mean over positions p != q holding different samples
    indices = np.array([0, 0, 1, 2, 2, 2, 5, 7])
    xr = x[indices]
    k_xx = F.polynomial_kernel(xr, xr)
    distinct = indices[:, None] != indices[None, :]
    k_yy = F.polynomial_kernel(y, y)
    expected = (k_xx[distinct].mean() + k_yy[~np.eye(30, dtype=bool)].mean()
                - 2 * F.polynomial_kernel(xr, y).mean())
    assert F.KID(y)(x)(indices) == pytest.approx(expected)


def test_extrapolated_fd_is_closer_to_the_true_fd_than_fd_at_few_samples():
    """(vii) N(0, I) against N(mu, diag(s^2)), true FD = |mu|^2 + sum (1 + s^2 - 2 s) = 1.49 here;
    the reference is 20,000 draws of the second. Over 8 sets of 500, the error of FD at N = 100 is
    its upward bias, several times the error of the intercept of FD = a + b / N."""
    rng = np.random.default_rng(2)
    mu, s = np.full(DIM, 0.25), np.linspace(0.5, 1.5, DIM)
    true_fd = mu @ mu + np.sum(1 + s ** 2 - 2 * s)
    reference = mu + s * rng.normal(size=(20000, DIM))
    small, extrapolated = [], []
    for _ in range(8):
        x = rng.normal(size=(500, DIM))
        small.append(frechet_distance(x[:100], reference))
        extrapolated.append(F.fd_infinity(x, reference, rng=rng))
    small_error, extrapolated_error = abs(np.mean(small) - true_fd), abs(np.mean(extrapolated) - true_fd)
    assert np.mean(small) > true_fd and extrapolated_error < small_error / 2
    assert np.mean(np.abs(np.array(extrapolated) - true_fd)) < np.mean(np.abs(np.array(small) - true_fd))


def test_fd_measures_read_a_resample():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(60, DIM))
    indices = rng.integers(0, 60, 60)
    assert F.FD(REFERENCE)(x)(indices) == pytest.approx(frechet_distance(x[indices], REFERENCE))
    twice = [F.FDInfinity(REFERENCE, seed=4)(x)(indices) for _ in range(2)]
    assert twice[0] == twice[1]  # seeded


# --- the protocol (verdicts: pipeline/compare/verdict.py, per seed) ----------------------------------------

def fits(runs, measure=None):
    return F.point_fits(runs, measure)


def test_a_model_copying_less_at_equal_quality_is_better_and_read_back():
    """(i) Same generator (so the same quality at the same progress), memorization 0.08 lower at
    every checkpoint, 4 seeds a side: the Welch interval over seeds holds -0.08 and lies below 0,
    and the relative difference is -0.08 over the baseline's copying at the matched levels."""
    rng = np.random.default_rng(10)
    model = [kid_run(rng, copies(offset=0.02), n=120) for _ in range(4)]
    baseline = [kid_run(rng, copies(offset=0.1), n=120) for _ in range(4)]
    c = V.compare_seeds(fits(model, KID_OF_REFERENCE), fits(baseline, KID_OF_REFERENCE))
    assert V.word(c) == V.BETTER and c.p == pytest.approx(2 / 70)
    assert c.low <= -0.08 <= c.high < 0
    assert -0.08 / 0.13 < c.relative < -0.08 / 0.40 and c.relative_low <= c.relative <= c.relative_high < 0


def test_a_model_that_only_trains_less_is_at_the_floor_with_the_baseline():
    """(iii) The baseline's own generator stopped at 40% of the run: it copies nothing (the
    baseline starts copying at 60%), and nor does the baseline at any quality it reaches."""
    rng = np.random.default_rng(20)
    late = lambda t: np.clip(0.8 * (t - 0.6), 0.0, 1.0)
    model = [kid_run(rng, late, progress=PROGRESS[PROGRESS <= 0.4 + 1e-9]) for _ in range(2)]
    baseline = [kid_run(rng, late) for _ in range(2)]
    c = V.compare_seeds(fits(model, KID_OF_REFERENCE), fits(baseline, KID_OF_REFERENCE))
    assert c.reason == F.NO_COMPARABLE_QUALITY and V.word(c) == V.BOTH_AT_FLOOR and np.isnan(c.estimate)


def test_a_baseline_whose_quality_degrades_as_it_copies_is_compared_at_its_best():
    """The fine-tuning regime: the baseline's quality improves until halfway and then degrades while
    its copying keeps rising; a mitigation trains the same until halfway, then holds its quality and
    copies a quarter as much. Compared where a user would stop either (4 seeds a side), it is
    better, by about 3/4 of the baseline's copying; neither is "not comparable", as every model was
    against the real fine-tuned baseline under a monotone quality fit (docs/history.md)."""
    rng = np.random.default_rng(50)
    degrading = lambda t: 0.9 + 1.5 * abs(t - 0.5) * (3.0 if t > 0.5 else 1.0)
    held = lambda t: 0.9 + 1.5 * max(0.5 - t, 0.0)
    copying = lambda t: np.clip(t - 0.2, 0.0, 1.0)
    baseline = [kid_run(rng, copying, shift=degrading) for _ in range(4)]
    mitigated = [kid_run(rng, lambda t: copying(t) / 4, shift=held) for _ in range(4)]
    c = V.compare_seeds(fits(mitigated, KID_OF_REFERENCE), fits(baseline, KID_OF_REFERENCE))
    assert c.reason is None and V.word(c) == V.BETTER
    assert c.relative_low < -0.75 < c.relative_high


def test_a_curve_crossing_the_baselines_reads_zero_on_average():
    """(iv) Memorization 0.0675 higher than the baseline's at the best quality and 0.0675 lower at the
    worst, 0 on average over the range: reading either end alone would call it worse or better."""
    rng = np.random.default_rng(30)
    crossing = lambda t: copies()(t) + 0.15 * (t - 0.55)
    model, baseline = fits([scalar_run(rng, crossing)])[0].frontier, fits([scalar_run(rng, copies())])[0].frontier
    point = F.matched_difference([model], [baseline])
    assert abs(point.area) < 0.02
    assert model(point.best) - baseline(point.best) > 0.03 and model(point.worst) - baseline(point.worst) < -0.03


def test_bands_resample_the_same_samples_at_every_checkpoint_and_are_reproducible():
    """Every checkpoint of a run is sampled from the same noise, so one bootstrap replicate draws the
    same sample indices at each: with every checkpoint's flags identical, each replicate's fitted
    memorization is flat (drawn independently it would wobble between checkpoints)."""
    rng = np.random.default_rng(40)
    flags = rng.random(60) < 0.3
    run = F.Run(tuple(F.Checkpoint(t, flags, quality=lambda i, t=t: float(1 - t)) for t in PROGRESS))
    resampled = F.resample([run], resamples=20, seed=1)
    assert all(np.ptp(fit.raw_memorization) == 0 for fit in resampled.replicates[0])
    assert _memorization(resampled) == _memorization(F.resample([run], resamples=20, seed=1))
    a, b = (scalar_run(rng, copies(), n=60) for _ in range(2))
    alone, beside = F.resample_models({"a": [a]}, resamples=10)["a"], F.resample_models({"b": [b], "a": [a]}, resamples=10)["a"]
    assert _memorization(alone) == _memorization(beside)


def _memorization(resampled):
    return [fit.raw_memorization.tolist() for fit in resampled.replicates[0]]


def test_checkpoints_need_one_quality_source_and_runs_distinct_progress():
    flags = np.array([True, False, False])
    with pytest.raises(ValueError, match="either features or a quality"):
        F.Checkpoint(0.5, flags)
    with pytest.raises(ValueError, match="feature rows"):
        F.Checkpoint(0.5, flags, features=np.zeros((2, DIM)))
    with pytest.raises(ValueError, match="need a measure"):
        F.Checkpoint(0.5, flags, features=np.zeros((3, DIM))).quality_fn(None)
    point = F.Checkpoint(0.5, flags, quality=lambda i: 0.0)
    with pytest.raises(ValueError, match="distinct progress"):
        F.Run((point, point))
    later = F.Checkpoint(0.9, flags, quality=lambda i: 0.0)
    assert [c.progress for c in F.Run((later, point)).checkpoints] == [0.5, 0.9]  # put in training order


def test_a_curve_file_round_trips_and_a_truncated_one_is_named(tmp_path):
    from pipeline.evaluate.frontier import Curve
    from pipeline.core.io import UnreadableFile
    from tiny import synthetic_curve

    curve = synthetic_curve([0.0, 0.5], [1.0, 0.0])
    curve.save(tmp_path / "curve.npz")
    back = Curve.load(tmp_path / "curve.npz")
    assert all(np.array_equal(getattr(back, f), getattr(curve, f)) for f in Curve.FIELDS)
    assert [c.memorized.mean() for c in back.run().checkpoints] == [0.0, 0.5] and back.floor == 0.0
    data = (tmp_path / "curve.npz").read_bytes()
    (tmp_path / "curve.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(UnreadableFile, match="curve.npz"):
        Curve.load(tmp_path / "curve.npz")
    with pytest.raises(FileNotFoundError, match="run the evaluate stage"):
        Curve.load(tmp_path / "missing.npz")
