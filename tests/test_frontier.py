"""The memorization-quality frontier protocol (pipeline/frontier.py, issue 22) on synthetic runs with
a known answer: frontiers by hand, the isotonic fits, KID and extrapolated FD against their
definitions, and the verdicts for a model that copies less at equal quality, another seed of the
baseline itself, one that only trains less, and one whose curve crosses the baseline's."""
import numpy as np
import pytest

from pipeline import frontier as F
from pipeline.metrics import frechet_distance, kernel_inception_distance

DIM = 8
REFERENCE = np.random.default_rng(12345).normal(size=(800, DIM))  # "real" features: N(0, I)


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
