"""The seed-level verdict protocol (pipeline/compare/verdict.py): its numbers by hand, its floors, its
words, its families, and its false-verdict rate on a null of known truth."""
import math

import numpy as np
import pytest
import scipy.stats

from pipeline.evaluate import frontier

from pipeline.compare import verdict
from pipeline.evaluate.frontier import fit_run

pytestmark = pytest.mark.usefixtures("one_thread")

PROGRESS = np.linspace(0.125, 1.0, 8)
SAMPLES = 256


def simulated_run(rng, offset=0.0, seed_sd=0.0, shared_sd=0.02, slope=0.12, base=0.02, samples=SAMPLES):
    """One seed's checkpoints: quality improving with training, copying growing with it; the seed
    moves the whole curve (seed_sd), and sampling noise shared by every checkpoint of the run
    (they are all sampled from the same noise) moves it again (shared_sd), then each checkpoint's
    copies are binomial."""
    level = base + offset + rng.normal(0, seed_sd) + rng.normal(0, shared_sd)
    rate = np.clip(level + slope * PROGRESS, 0, 1)
    memorization = rng.binomial(samples, rate) / samples
    quality = 1.5 * (1.1 - PROGRESS) + rng.normal(0, 0.01, len(PROGRESS))
    return fit_run(memorization, quality, [samples] * len(PROGRESS))


def by_hand(scores_model, scores_base):
    a, b = np.asarray(scores_model), np.asarray(scores_base)
    return scipy.stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)


def test_estimate_and_welch_interval_are_those_of_the_per_seed_scores():
    rng = np.random.default_rng(0)
    model = [simulated_run(rng, -0.03, 0.04) for _ in range(3)]
    base = [simulated_run(rng, 0.0, 0.04) for _ in range(4)]
    c = verdict.compare_seeds(model, base)
    point = frontier.matched_difference([f.frontier for f in model], [f.frontier for f in base])
    assert c.estimate == pytest.approx(point.matched, abs=1e-12)
    assert c.estimate == pytest.approx(np.mean(c.model_scores) - np.mean(c.baseline_scores))
    low, high = by_hand(c.model_scores, c.baseline_scores)
    assert (c.low, c.high) == pytest.approx((low, high))
    assert c.p_min == pytest.approx(2 / math.comb(7, 3))


@pytest.mark.parametrize("model_seeds, baseline_seeds, least", [(3, 3, 0.1), (3, 6, 2 / 84), (6, 6, 2 / 924)])
def test_the_least_reachable_p_is_that_of_the_design(model_seeds, baseline_seeds, least):
    """A model far below the baseline in every seed reaches exactly the design's least p; 3 vs 3
    cannot reach 0.05, so it gives no verdict however large the effect."""
    rng = np.random.default_rng(1)
    model = [simulated_run(rng, -0.015, 0.002, 0.002, base=0.02) for _ in range(model_seeds)]
    base = [simulated_run(rng, 0.2, 0.002, 0.002) for _ in range(baseline_seeds)]
    c = verdict.compare_seeds(model, base)
    assert c.p == pytest.approx(least) and c.p_min == pytest.approx(least)
    assert verdict.word(c) == (verdict.BETTER if least < 0.05 else verdict.INCONCLUSIVE)


def test_one_seed_a_side_is_no_verdict():
    rng = np.random.default_rng(2)
    c = verdict.compare_seeds([simulated_run(rng, -0.1)], [simulated_run(rng) for _ in range(3)])
    assert math.isnan(c.low) and verdict.word(c) == verdict.ONE_SEED


def test_a_side_copying_nothing_gets_its_clopper_pearson_bound_not_a_zero_width_interval():
    rng = np.random.default_rng(3)
    zero = [fit_run(np.zeros(8), 1.5 * (1.1 - PROGRESS), [SAMPLES] * 8) for _ in range(3)]
    base = [simulated_run(rng, 0.1, 0.01) for _ in range(6)]
    c = verdict.compare_seeds(zero, base, samples=[SAMPLES] * 9)
    # 0 copies in 3 x 256 samples: at most 1 - 0.025^(1/768), two-sided 95% (Clopper & Pearson 1934)
    assert c.model_bound == pytest.approx(1 - 0.025 ** (1 / 768))
    assert c.high - c.low > c.model_bound  # the bound's width is in the interval
    assert verdict.word(c) == verdict.BELOW_FLOOR_BOUND
    assert verdict.clopper_pearson_upper(0, 256) == pytest.approx(0.0143, abs=1e-4)


def test_nothing_above_the_floor_on_both_sides_is_both_at_the_floor():
    quiet = [fit_run(np.zeros(8), 1.5 * (1.1 - PROGRESS), [SAMPLES] * 8) for _ in range(3)]
    c = verdict.compare_seeds(quiet, quiet, floor=0.0)
    assert c.reason == frontier.NO_COMPARABLE_QUALITY and verdict.word(c) == verdict.BOTH_AT_FLOOR


def test_indistinguishable_needs_the_equivalence_test():
    rng = np.random.default_rng(4)
    tight = [simulated_run(rng, 0.0, 0.002, 0.002) for _ in range(12)]
    c = verdict.compare_seeds(tight[:6], tight[6:])
    assert c.equivalence_p < 0.05 and verdict.word(c) == verdict.INDISTINGUISHABLE
    loose = [simulated_run(rng, 0.0, 0.06) for _ in range(6)]
    c = verdict.compare_seeds(loose[:3], loose[3:])
    assert verdict.word(c) == verdict.INCONCLUSIVE  # no difference found is not "the same"


def test_not_comparable_when_no_common_quality_range():
    early = fit_run(np.full(8, 0.01), 5 + PROGRESS[::-1], [SAMPLES] * 8)
    late = fit_run(np.full(8, 0.2), 1 + PROGRESS[::-1] * 0.1, [SAMPLES] * 8)
    c = verdict.compare_seeds([early] * 2, [late] * 2)
    assert c.reason == frontier.NO_COMMON_RANGE and verdict.word(c) == verdict.NOT_COMPARABLE


def test_holm_and_benjamini_hochberg_by_hand():
    p = [0.01, 0.04, 0.03, 0.2]
    assert verdict.holm(p) == pytest.approx([0.04, 0.09, 0.09, 0.2])
    assert verdict.benjamini_hochberg(p) == pytest.approx([0.04, 0.0533333, 0.0533333, 0.2])


def test_seeds_for_power_at_the_issue_s_effects():
    # a two-sample t test at 5%, 80% power: 2 seed-sd needs 6 a side, 1.5 sd 9, 1 sd 17
    assert [verdict.seeds_for_power(d) for d in (2.0, 1.5, 1.0)] == [6, 9, 17]


def test_false_verdicts_on_a_null_of_known_truth_stay_near_five_percent():
    """Model and baseline drawn from the same process (seed spread and shared sampling noise as
    measured): at 3 vs 6 seeds the protocol may call better/worse at most about 5% of the time;
    allowing for 120 simulations, fewer than 14 (binomial upper tail at 5%: P(X >= 14) < 0.01)."""
    rng = np.random.default_rng(5)
    false = 0
    for _ in range(120):
        runs = [simulated_run(rng, 0.0, 0.046) for _ in range(9)]
        false += verdict.word(verdict.compare_seeds(runs[:3], runs[3:])) in (verdict.BETTER, verdict.WORSE)
    assert false < 14


def test_a_real_difference_of_two_seed_sd_is_found_at_six_seeds_a_side():
    rng = np.random.default_rng(6)
    found = sum(verdict.word(verdict.compare_seeds([simulated_run(rng, -0.092, 0.046) for _ in range(6)],
                                                   [simulated_run(rng, 0.0, 0.046) for _ in range(6)]))
                == verdict.BETTER for _ in range(30))
    assert found >= 15  # power about 0.7-0.8 here; chance alone gives about 1


def test_the_vectorised_permutation_statistic_is_the_comparison_recomputed_per_labeling():
    """Every relabeling's statistic equals compare_seeds' own reading of that labeling."""
    rng = np.random.default_rng(7)
    runs = [simulated_run(rng, 0.0, 0.04) for _ in range(5)]
    pool = verdict._pool(runs)
    marks = verdict._labelings(5, 3, rng)
    values = verdict._differences(pool, marks, 0.0)
    for mark, value in zip(marks, values):
        model = [r for r, m in zip(runs, mark) if not m]
        base = [r for r, m in zip(runs, mark) if m]
        assert value == pytest.approx(verdict.compare_seeds(model, base).estimate, abs=1e-12)
