"""Memorization scores, Frechet distance / KID, the feature classifier and the figures.

The memorization metric is checked three ways: the neighbour search against brute force, planted
copies that it must find (and only those), and real held-out images that it must leave alone.
"""
import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits

from pipeline.evaluate import features

from pipeline.core import figures, metrics


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits():
    """sklearn's real 8x8 digits in [-1, 1], split in half by a seeded permutation."""
    x, y = load_digits(return_X_y=True)
    images = torch.tensor(x, dtype=torch.float32).view(-1, 1, 8, 8) / 8.0 - 1.0
    labels = torch.tensor(y, dtype=torch.int64)
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    train, heldout = order[: len(order) // 2], order[len(order) // 2:]
    return images[train], labels[train], images[heldout], labels[heldout]


@pytest.fixture(scope="module")
def digit_net(digits):
    train_x, train_y, _, _ = digits
    return features.train_feature_net(train_x, train_y, channels=1, epochs=3, seed=0, progress=False)


def smooth_images(n: int, seed: int, channels: int = 3, size: int = 16) -> torch.Tensor:
    """Random but image-like: 4x4 noise upsampled bilinearly, plus a little pixel noise, in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, channels, 4, 4, generator=g) * 2 - 1
    fine = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    return (fine + 0.05 * torch.randn(fine.shape, generator=g)).clamp(-1, 1)


# ---------------------------------------------------------------- nearest neighbours

@pytest.mark.parametrize("k, chunk", [
    (1, 4096),  # one block each way
    (3, 64),    # chunked both ways; 64/16 = 4 groups > k: the first block's threshold is the
    (5, 128),   # k-th group max; the last block (300 % 64 = 44 columns) is padded to 48
    (50, 32),   # k larger than a block: the running best fills up over several blocks
    (500, 64),  # k > N: clipped to N, every reference image returned in order
    (7, 100),   # blocks of 100 columns, not a multiple of GROUP: every block padded
])
def test_nearest_neighbors_match_brute_force(k, chunk):
    g = torch.Generator().manual_seed(k)
    queries = torch.randn(150, 3, 4, 4, generator=g)
    reference = torch.randn(300, 3, 4, 4, generator=g)
    d, i = metrics.nearest_neighbors(queries, reference, k, chunk=chunk)

    exact = torch.cdist(queries.flatten(1), reference.flatten(1),
                        compute_mode="donot_use_mm_for_euclid_dist").square()
    k_eff = min(k, len(reference))
    assert d.shape == i.shape == (150, k_eff) and i.dtype == torch.int64
    assert_same_neighbours(d, i, exact)


def assert_same_neighbours(d, i, exact):
    """(d, i) is what sorting the brute-force distances `exact` gives; only two reference images
    at the same distance up to float32 rounding (which the two computations do differently) may
    come in either order."""
    k = i.shape[1]
    ref_d, ref_i = exact.sort(dim=1)
    ref_d, ref_i = ref_d[:, :k], ref_i[:, :k]
    close = (ref_d[:, 1:] - ref_d[:, :-1]) <= 1e-6 * ref_d[:, 1:]
    tied = torch.zeros_like(ref_d, dtype=torch.bool)
    tied[:, 1:] |= close
    tied[:, :-1] |= close
    assert tied.float().mean() < 0.01  # the data is generic: ties are the rare exception
    assert torch.equal(i[~tied], ref_i[~tied])
    torch.testing.assert_close(exact.gather(1, i), ref_d, rtol=1e-6, atol=0)  # at ties: as near
    assert all(len(set(row.tolist())) == k for row in i)  # no image twice
    torch.testing.assert_close(d, ref_d, rtol=1e-5, atol=1e-5)


def test_nearest_neighbors_pruning_stays_exact_when_neighbours_cluster_in_one_chunk():
    # Every query's nearest images sit in the last full chunk, so the running best from the first
    # chunks is poor and the pruned merge must take many groups from that one chunk.
    g = torch.Generator().manual_seed(1)
    queries = torch.randn(40, 48, generator=g)
    far = torch.randn(256, 48, generator=g) * 3 + 5
    near = queries.repeat_interleave(2, 0)[:64] + 0.1 * torch.randn(64, 48, generator=g)
    reference = torch.cat([far, near, torch.randn(64, 48, generator=g) * 3 + 5])
    d, i = metrics.nearest_neighbors(queries, reference, 20, chunk=64)
    assert_same_neighbours(d, i, torch.cdist(queries, reference, compute_mode="donot_use_mm_for_euclid_dist").square())


@pytest.mark.parametrize("k", [1, 2, 50])
def test_nearest_neighbors_pruned_path_on_a_single_reference_chunk(k):
    # 1024 = 64 groups of 16 > k in one chunk: the first block's candidates must be cut to k.
    g = torch.Generator().manual_seed(k)
    queries, reference = torch.randn(20, 64, generator=g), torch.randn(1024, 64, generator=g)
    d, i = metrics.nearest_neighbors(queries, reference, k)
    assert_same_neighbours(d, i, torch.cdist(queries, reference, compute_mode="donot_use_mm_for_euclid_dist").square())


@pytest.mark.parametrize("k", [1, 50])
@pytest.mark.parametrize("chunk", [64, 100, 1000, 4096])
def test_nearest_neighbors_match_brute_force_with_duplicated_reference_images(k, chunk):
    # Exact duplicates tie at every threshold the pruning compares with (one image 80 times: more
    # than k copies, all at distance 0 from the queries that copy it); the tied set may come in
    # any order, but it must be k distinct images at the k smallest distances.
    g = torch.Generator().manual_seed(k + chunk)
    unique = torch.randn(1500, 40, generator=g)
    picks = torch.randint(0, 1500, (500,), generator=g)
    reference = torch.cat([unique, unique[picks], unique[3].expand(80, 40)])
    reference = reference[torch.randperm(len(reference), generator=g)]
    queries = torch.cat([torch.randn(150, 40, generator=g), unique[[3, 5, 8]], unique[picks[:20]]])
    d, i = metrics.nearest_neighbors(queries, reference, k, chunk=chunk)

    exact = torch.cdist(queries, reference, compute_mode="donot_use_mm_for_euclid_dist").square()
    ref_d = exact.sort(dim=1).values[:, :k]
    torch.testing.assert_close(d, ref_d, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(exact.gather(1, i), ref_d, rtol=1e-5, atol=1e-6)
    assert all(len(set(row.tolist())) == k for row in i)
    assert (d[150] == 0).all() and (d[150:, 0] == 0).all()


def test_nearest_neighbors_when_every_reference_image_is_the_same():
    # Every value of every block ties with the threshold: all of them stay candidates.
    g = torch.Generator().manual_seed(4)
    reference, queries = torch.randn(1, 24, generator=g).expand(700, 24), torch.randn(30, 24, generator=g)
    d, i = metrics.nearest_neighbors(queries, reference, 50, chunk=256)
    torch.testing.assert_close(d, ((queries - reference[:1]) ** 2).sum(1, keepdim=True).expand(30, 50))
    assert all(len(set(row.tolist())) == 50 for row in i) and i.max() < 700


@pytest.mark.parametrize("chunk", [64, 4096])
def test_nearest_neighbors_skip_a_nan_image_and_keep_the_rest_of_its_group(chunk):
    # A NaN reference image makes its group's max NaN; the group's other images must still be
    # found, and a NaN query must come back as NaN distances, not as an error.
    g = torch.Generator().manual_seed(5)
    reference, queries = torch.randn(1000, 32, generator=g), torch.randn(40, 32, generator=g)
    queries[:20] = reference[[1, 2, 3, 4, 5] * 4] + 0.01 * torch.randn(20, 32, generator=g)
    reference[[0, 6, 500]] = float("nan")  # beside images 1-5, in their group of 16
    queries[39] = float("nan")
    d, i = metrics.nearest_neighbors(queries, reference, 50, chunk=chunk)

    exact = torch.cdist(queries[:39], reference, compute_mode="donot_use_mm_for_euclid_dist").square()
    exact[:, [0, 6, 500]] = torch.inf
    assert_same_neighbours(d[:39], i[:39], exact)
    assert d[39].isnan().all()


def test_nearest_neighbors_distances_of_near_copies_are_exact():
    # |q|^2 + |r|^2 - 2 q.r in float32 would be off by ~1e-4 here; a copy at d^2 = 1e-8 must stay one.
    g = torch.Generator().manual_seed(2)
    reference = torch.rand(100, 3, 16, 16, generator=g) * 2 - 1
    queries = reference[:5] + 1e-4 * (torch.arange(5).view(5, 1, 1, 1) + 1)
    d, i = metrics.nearest_neighbors(queries, reference, 2)
    assert torch.equal(i[:, 0], torch.arange(5))
    expected = (queries - reference[:5]).flatten(1).square().sum(1)
    torch.testing.assert_close(d[:, 0], expected, rtol=1e-3, atol=0)


# ---------------------------------------------------------------- memorization scores

def test_planted_copies_are_found_and_only_they():
    train = smooth_images(200, seed=0)
    fresh = smooth_images(32, seed=1)
    g = torch.Generator().manual_seed(2)
    sources = torch.tensor([3, 17, 42, 64, 99, 123, 150, 199])
    copies = train[sources] + 0.01 * torch.randn(train[sources].shape, generator=g)
    generated = torch.cat([copies, fresh])
    n_planted = len(sources)

    scores = metrics.memorization_scores(generated, train)
    summary = metrics.summarize(scores)
    assert summary["mem_ratio"] == n_planted / len(generated)
    assert (scores["ratio"][:n_planted] < 1 / 3).all() and (scores["ratio"][n_planted:] >= 1 / 3).all()
    np.testing.assert_array_equal(scores["nn1_index"][:n_planted], sources.numpy())
    assert (scores["official"][:n_planted] < metrics.OFFICIAL_THRESHOLDS[0]).all()
    assert summary["official_below_0.15"] == pytest.approx(
        float(np.mean(scores["official"] < 0.15)))
    assert summary["official_below_0.15"] >= n_planted / len(generated)

    # The scores are what docs/method.md#metrics defines, against direct computation.
    dist = torch.cdist(generated.flatten(1).double(), train.flatten(1).double()).sort(dim=1).values.numpy()
    np.testing.assert_allclose(scores["nn1"], dist[:, 0], rtol=1e-4)
    np.testing.assert_allclose(scores["ratio"], dist[:, 0] / dist[:, 1], rtol=1e-4)
    official = dist[:, 0] ** 2 / (dist[:, :50] ** 2).mean(1)
    np.testing.assert_allclose(scores["official"], official, rtol=1e-4)


def test_exact_copy_of_a_duplicated_training_image_counts_as_memorized():
    train = smooth_images(20, seed=3)
    train[7] = train[4]  # nn1 = nn2 = 0 for a copy of it: 0/0 must read as a copy, not NaN
    scores = metrics.memorization_scores(train[4:5].clone(), train, k_official=5)
    assert scores["ratio"][0] == 0.0 and scores["official"][0] == 0.0
    assert metrics.summarize(scores, prefix="x_")["x_mem_ratio"] == 1.0


def test_summary_keys_and_prefix():
    scores = {"ratio": np.array([0.1, 0.5, 0.9, 0.2]), "official": np.array([0.1, 0.25, 0.95, 0.5]),
              "nn1": np.array([1.0, 2.0, 3.0, 4.0])}
    s = metrics.summarize(scores, prefix="heldout_")
    assert s["heldout_mem_ratio"] == 0.5
    assert s["heldout_mean_nn1"] == 2.5
    assert s["heldout_official_below_0.15"] == 0.25 and s["heldout_official_below_0.3"] == 0.5
    assert s["heldout_official_below_0.9"] == 0.75
    assert len(s) == 2 + len(metrics.OFFICIAL_THRESHOLDS) and all(k.startswith("heldout_") for k in s)


def test_heldout_real_digits_are_not_called_copies(digits):
    train_x, _, heldout_x, _ = digits
    scores = metrics.memorization_scores(heldout_x, train_x)
    # Measured: 0 of 899 held-out digits below 1/3; the smallest ratio is 0.50. Real images the
    # model never saw are the metric's false-positive rate, which must be near zero for the
    # headline to mean anything. 1% (9 images) leaves room for another split, not for a broken test.
    assert metrics.summarize(scores)["mem_ratio"] < 0.01
    assert np.median(scores["ratio"]) > 0.7  # typically NN2 is barely farther than NN1


# ---------------------------------------------------------------- Frechet distance and KID

def gaussian_with_exact_moments(n, mean, cov, seed):
    """n points whose sample mean and (ddof=1) covariance are exactly `mean` and `cov`."""
    x = np.random.default_rng(seed).standard_normal((n, len(mean)))
    x -= x.mean(0)
    x = x @ np.linalg.inv(np.linalg.cholesky(np.cov(x, rowvar=False))).T  # sample cov = I
    return x @ np.linalg.cholesky(cov).T + mean


def test_frechet_distance_of_identical_sets_is_zero():
    x = np.random.default_rng(0).standard_normal((500, 16))
    assert abs(metrics.frechet_distance(x, x)) < 1e-6


def test_frechet_distance_matches_closed_form_for_gaussians():
    # Covariances sharing eigenvectors: (S_a S_b)^(1/2) = Q sqrt(a b) Q^T, so the distance is
    # |mu_a - mu_b|^2 + sum (sqrt(a) - sqrt(b))^2, computed here without any matrix square root.
    rng = np.random.default_rng(1)
    q, _ = np.linalg.qr(rng.standard_normal((6, 6)))
    eig_a, eig_b = np.array([1.0, 2, 3, 4, 5, 6]), np.array([0.5, 4, 1, 9, 2, 1])
    mu_a, mu_b = rng.standard_normal(6), rng.standard_normal(6)
    a = gaussian_with_exact_moments(400, mu_a, q @ np.diag(eig_a) @ q.T, seed=2)
    b = gaussian_with_exact_moments(300, mu_b, q @ np.diag(eig_b) @ q.T, seed=3)
    closed = np.sum((mu_a - mu_b) ** 2) + np.sum((np.sqrt(eig_a) - np.sqrt(eig_b)) ** 2)
    assert metrics.frechet_distance(a, b) == pytest.approx(closed, rel=1e-6)


def test_frechet_distance_survives_singular_covariances():
    x = np.random.default_rng(4).standard_normal((10, 32))  # 10 points in 32 dims: rank 9
    fd = metrics.frechet_distance(x, x + 1.0)
    assert np.isfinite(fd) and fd == pytest.approx(32.0, rel=1e-2)


def test_kid_is_zero_for_identical_sets_and_positive_for_shifted_ones():
    x = np.random.default_rng(5).standard_normal((4000, 16))
    # With a set against itself the two subsets share points, whose self-kernel inflates the cross
    # term: a small negative bias of about -2 (k(x, x) - k(x, y)) / len(x), here ~ -0.004.
    same = metrics.kernel_inception_distance(x, x, subsets=10, subset_size=1000)
    shifted = metrics.kernel_inception_distance(x, x + 0.5, subsets=10, subset_size=1000)
    assert abs(same) < 0.01
    assert shifted > 0.5  # the cubic kernel's MMD^2 for this shift is ~1.0
    assert same == metrics.kernel_inception_distance(x, x, subsets=10, subset_size=1000)  # seeded


# ---------------------------------------------------------------- feature classifier

def test_feature_net_learns_digits(digit_net, digits):
    net, info = digit_net
    _, _, heldout_x, heldout_y = digits
    assert info["trained"] and info["accuracy"] > 0.7  # chance is 0.1
    with torch.no_grad():
        assert (net(heldout_x).argmax(1) == heldout_y).float().mean() > 0.7
    f = features.extract_features(net, heldout_x, batch_size=100)
    assert f.shape == (len(heldout_x), 64) and f.dtype == np.float32


def test_feature_net_roundtrip_gives_identical_features(digit_net, digits, tmp_path):
    net, _ = digit_net
    x = digits[2][:50]
    path = tmp_path / "net"
    features.save_feature_net(net, path)
    features.save_feature_net(net, path)  # overwriting an existing model works
    loaded = features.load_feature_net(path)
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors"]
    np.testing.assert_array_equal(features.extract_features(loaded, x), features.extract_features(net, x))
    assert [p.name for p in tmp_path.iterdir()] == ["net"]  # no temporary directories left behind


def test_unlabelled_images_give_a_seeded_untrained_net(digits):
    x = digits[0][:64]
    unlabelled = torch.full((len(x),), -1)
    net, info = features.train_feature_net(x, unlabelled, channels=1, epochs=5, seed=3, progress=False)
    again, _ = features.train_feature_net(x, unlabelled, channels=1, epochs=5, seed=3, progress=False)
    assert info["trained"] is False
    np.testing.assert_array_equal(features.extract_features(net, x), features.extract_features(again, x))


def test_frechet_distance_separates_real_digits_from_noise(digit_net, digits):
    net, _ = digit_net
    train_x, _, heldout_x, _ = digits
    noise = torch.rand(heldout_x.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    f_train, f_held, f_noise = (features.extract_features(net, x) for x in (train_x, heldout_x, noise))
    real = metrics.frechet_distance(f_train, f_held)
    fake = metrics.frechet_distance(f_train, f_noise)
    assert real < 0.1 * fake


# ---------------------------------------------------------------- figures

def assert_png(path):
    assert path.stat().st_size > 0
    with Image.open(path) as im:
        assert im.format == "PNG" and im.width > 0 and im.height > 0
        im.load()


@pytest.mark.parametrize("channels", [1, 3])
def test_figures_write_valid_pngs(tmp_path, channels):
    train = smooth_images(30, seed=6, channels=channels)
    samples = torch.cat([train[:3] + 0.01, smooth_images(17, seed=7, channels=channels)])
    gen_scores = metrics.memorization_scores(samples, train)
    held_scores = metrics.memorization_scores(smooth_images(20, seed=8, channels=channels), train)

    figures.save_grid(samples, tmp_path / "grid.png", nrow=8)
    figures.save_copies_figure(samples, train, gen_scores, tmp_path / "copies.png", top=16)
    figures.save_ratio_histogram(gen_scores, held_scores, tmp_path / "hist.png")
    for name in ("grid.png", "copies.png", "hist.png"):
        assert_png(tmp_path / name)
    with Image.open(tmp_path / "grid.png") as im:
        assert im.width >= 8 * 16 * 4  # 16x16 images upscaled x4
