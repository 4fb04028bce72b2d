"""Membership inference: the ROC statistics against known answers, the two attacks' formulas on a
model whose outputs are known, and the attacks on an untrained and an overfitted tiny UNet."""
from types import SimpleNamespace

import numpy as np
import pytest
import scipy.stats
import torch
from sklearn.metrics import roc_auc_score, roc_curve

from pipeline.evaluate import privacy
from pipeline.core.config import ModelConfig
from pipeline.core.models import build_scheduler, build_unet
from tiny import arch

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = arch(num_train_timesteps=1000)


def test_auc_and_tpr_match_sklearn_with_ties():
    rng = np.random.default_rng(0)
    members, nonmembers = rng.integers(0, 12, 150), rng.integers(0, 10, 170)  # many ties
    labels = np.r_[np.ones(150), np.zeros(170)]
    scores = np.r_[members, nonmembers]
    assert privacy.roc_auc(members, nonmembers) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    for target in (0.0, 0.01, 0.05, 0.2, 0.5):
        assert privacy.tpr_at_fpr(members, nonmembers, target) == pytest.approx(tpr[fpr <= target].max())


def test_auc_direction_higher_score_means_member():
    assert privacy.roc_auc([3.0, 4.0], [1.0, 2.0]) == 1.0
    assert privacy.roc_auc([1.0, 2.0], [3.0, 4.0]) == 0.0


def test_gaussian_scores_give_the_known_auc_and_tpr():
    """Two unit normals d apart: AUC = Phi(d / sqrt 2); TPR at FPR f = 1 - Phi(Phi^-1(1 - f) - d)."""
    rng = np.random.default_rng(1)
    d = 1.0
    members, nonmembers = rng.normal(d, 1.0, 2000), rng.normal(0.0, 1.0, 2000)
    auc = scipy.stats.norm.cdf(d / np.sqrt(2))  # 0.760
    low, high = privacy.bootstrap_interval(members, nonmembers, privacy.roc_auc, n=500, seed=0)
    assert low < auc < high and high - low < 0.05
    tpr = 1 - scipy.stats.norm.cdf(scipy.stats.norm.ppf(0.9) - d)  # 0.389 at 10% FPR
    low, high = privacy.bootstrap_interval(members, nonmembers, lambda m, n: privacy.tpr_at_fpr(m, n, 0.1),
                                           n=500, seed=0)
    assert low < tpr < high


def test_identical_distributions_give_an_interval_around_one_half():
    rng = np.random.default_rng(2)
    members, nonmembers = rng.normal(size=300), rng.normal(size=300)
    low, high = privacy.bootstrap_interval(members, nonmembers, privacy.roc_auc, n=500, seed=0)
    assert low < 0.5 < high and high - low < 0.15


def test_balanced_cuts_the_larger_set_seeded_and_in_order():
    members, nonmembers = np.arange(10), np.arange(100, 130)
    m, n = privacy.balanced(members, nonmembers, seed=3)
    assert m is members and len(n) == 10 and np.all(np.diff(n) > 0) and set(n) <= set(nonmembers)
    np.testing.assert_array_equal(privacy.balanced(members, nonmembers, seed=3)[1], n)
    assert not np.array_equal(privacy.balanced(members, nonmembers, seed=4)[1], n)
    tm, tn = privacy.balanced(torch.arange(30.0), torch.arange(5.0), seed=3)
    assert tm.shape == (5,) and tn.shape == (5,)


class ScaledInput(torch.nn.Module):
    """A stand-in UNet: eps_theta(x, t) = (1 + t / 100) * x, so every quantity has a closed form."""

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # gives the attacks a device to read

    def forward(self, x, t):
        return SimpleNamespace(sample=x * (1 + t.float().view(-1, 1, 1, 1) / 100))


def test_pia_follows_the_formula():
    scheduler = build_scheduler(TINY)
    x0 = torch.randn(5, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    t = 200
    abar = scheduler.alphas_cumprod[t]
    # eps0 = x0 (t = 0); x_t = (sqrt abar + sqrt(1 - abar)) x0; eps_t = 3 x_t
    factor = 3 * (abar.sqrt() + (1 - abar).sqrt()) - 1
    expected = -(factor.abs() * x0.abs().pow(4).flatten(1).sum(1).pow(0.25))
    got = privacy.pia_scores(ScaledInput(), scheduler, x0, t=t, batch_size=2)
    np.testing.assert_allclose(got, expected.numpy(), rtol=1e-5)
    assert privacy.pia_timestep(scheduler) == 200
    assert privacy.pia_timestep(build_scheduler(ModelConfig(num_train_timesteps=50))) == 10


class Zero(ScaledInput):
    def forward(self, x, t):
        return SimpleNamespace(sample=torch.zeros_like(x))


def test_loss_draws_are_shared_by_every_image():
    """A model predicting 0 has loss mean(eps^2): the same for every image exactly when the (t, eps)
    draws do not depend on the image or its position."""
    scheduler = build_scheduler(TINY)
    images = torch.rand(7, 3, 4, 4) * 2 - 1
    scores = privacy.loss_scores(Zero(), scheduler, images, pairs=5, seed=11, batch_size=3)
    draws = [privacy._pair_draw(11, p, (3, 4, 4), 1000)[1] for p in range(5)]
    expected = -np.mean([float(eps.pow(2).mean()) for eps in draws])
    np.testing.assert_allclose(scores, expected, rtol=1e-6)


def random_images(n, seed, size=8):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_an_image_score_does_not_depend_on_the_others():
    unet = build_unet(TINY, 8, 3, seed=0)
    scheduler = build_scheduler(TINY)
    images = random_images(12, 1)
    full = privacy.loss_scores(unet, scheduler, images, pairs=3, seed=2, batch_size=5)
    part = privacy.loss_scores(unet, scheduler, images[[9, 2, 4]], pairs=3, seed=2, batch_size=12)
    np.testing.assert_allclose(part, full[[9, 2, 4]], rtol=1e-5)
    assert unet.training  # left as found


def test_untrained_model_leaks_nothing():
    cfg = ModelConfig(block_out_channels=(8, 16), attention=False, num_train_timesteps=50)
    unet, scheduler = build_unet(cfg, 8, 3, seed=0), build_scheduler(cfg)
    out = privacy.membership_inference(unet, scheduler, random_images(96, 2), random_images(80, 3),
                                       seed=0, pairs=4, bootstrap=300)
    keys = {f"{attack}_{m}" for attack in ("mia", "pia") for m in ("auc", "auc_low", "auc_high", "tpr_at_1fpr")}
    assert set(out) == keys | {"mia_members"} and out["mia_members"] == 80
    for attack in ("mia", "pia"):
        assert out[f"{attack}_auc_low"] < 0.5 < out[f"{attack}_auc_high"], out


def smooth_images(n, seed, size=8):
    coarse = torch.rand(n, 3, 3, 3, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    return torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)


def test_overfitted_model_is_caught_by_the_loss_attack():
    """300 full-batch Adam steps on 8 images (about 4 s on one thread): the loss attack must tell
    them from 8 unseen images of the same kind."""
    unet, scheduler = build_unet(TINY, 8, 3, seed=0), build_scheduler(TINY)
    data = smooth_images(16, 100)
    members, nonmembers = data[:8], data[8:]
    opt = torch.optim.Adam(unet.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        noise, t = torch.randn(members.shape, generator=g), torch.randint(0, 1000, (8,), generator=g)
        loss = (unet(scheduler.add_noise(members, noise, t), t).sample - noise).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    out = privacy.membership_inference(unet, scheduler, members, nonmembers, seed=0, pairs=32,
                                       bootstrap=200)
    assert out["mia_auc"] >= 0.9 and out["mia_auc_low"] > 0.5, out
