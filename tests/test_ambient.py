"""Ambient high-noise training (pipeline/mitigation/ambient.py) against its formulas: the loss it
trains is the ambient loss of docs/method.md#references, its minimiser above t_n is the posterior mean of the clean
image (a Gaussian toy where that is known in closed form), and below t_n it is the plain objective."""
import copy

import pytest
import torch

from pipeline.mitigation.ambient import ambient_objective
from pipeline.core.models import build_scheduler
from tiny import arch

ABAR = build_scheduler(arch(num_train_timesteps=1000)).alphas_cumprod
T_N = 400


def _draw(n, t, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(n, 1, 2, 2, generator=g) * scale
    eta, noise = torch.randn(x0.shape, generator=g), torch.randn(x0.shape, generator=g)
    return x0, eta, noise, torch.full((n,), t)


def test_the_loss_it_trains_is_the_ambient_loss_of_method_md():
    x0, eta, noise, t = _draw(64, 700)
    xt, target = ambient_objective(x0, eta, t, noise, ABAR, T_N)
    pred = torch.randn(xt.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    a, n = ABAR.double()[700], ABAR.double()[T_N]
    x_n = n.sqrt() * x0.double() + (1 - n).sqrt() * eta.double()
    assert torch.allclose(xt.double(), (a / n).sqrt() * x_n + (1 - a / n).sqrt() * noise.double(), atol=1e-6)
    x0_hat = (xt.double() - (1 - a).sqrt() * pred) / a.sqrt()
    c1, c2 = n.sqrt() * (1 - a / n) / (1 - a), (a / n).sqrt() * (1 - n) / (1 - a)
    ambient = (c1 * x0_hat + c2 * xt.double() - x_n).pow(2)
    scale = (c1 * (1 - a).sqrt() / a.sqrt()) ** 2  # the same loss in epsilon units
    torch.testing.assert_close(ambient, scale * (pred - target.double()).pow(2), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("t", [450, 700, 950])
def test_its_minimiser_above_t_n_is_the_posterior_mean_of_the_clean_image(t):
    """x0 ~ N(0, v): E[x0 | x_t] = a v x_t / (a^2 v + s^2), so the best prediction is linear,
    pred = beta x_t, with beta = s / (a^2 v + s^2) -- what the plain epsilon target gives. The least
    squares fit of the ambient target on x_t must find it, though x0 is never shown."""
    v = 0.25
    x0, eta, noise, steps = _draw(60_000, t, seed=t, scale=v ** 0.5)
    xt, target = ambient_objective(x0, eta, steps, noise, ABAR, T_N)
    x, y = xt.flatten().double(), target.flatten().double()
    beta = float((x * y).sum() / (x * x).sum())
    a2 = float(ABAR[t])
    assert beta == pytest.approx((1 - a2) ** 0.5 / (a2 * v + 1 - a2), rel=0.02)


def test_at_and_below_t_n_it_is_the_plain_ddpm_objective():
    x0, eta, noise, _ = _draw(8, 0)
    t = torch.tensor([0, 10, 200, T_N, 0, 1, 399, T_N])
    xt, target = ambient_objective(x0, eta, t, noise, ABAR, T_N)
    sched = build_scheduler(arch(num_train_timesteps=1000))
    torch.testing.assert_close(xt, sched.add_noise(x0, noise, t), rtol=1e-5, atol=1e-6)
    assert torch.equal(target, noise)


def test_a_tiny_ambient_run_trains_and_is_named_with_its_level(tmp_path):
    from pipeline.train import rounds
    from pipeline.core.config import parse_params
    from pipeline.train.ensemble import split_shards
    from test_pinned import TINY
    from tiny import random_train

    raw = copy.deepcopy(TINY)
    raw.update(agc={"enabled": False}, ambient={"enabled": True, "timestep": 4}, iet={**TINY["iet"], "shards": 1})
    p = parse_params(raw)
    train = random_train()
    summary = rounds.run(p, rounds.Plan.iet(p), train, split_shards(train.labels, 1, 0), tmp_path / "out",
                         tmp_path / "rounds")
    assert summary["variant"] == "ambient (t_n=4.0)" and summary["ambient"] is True


def test_the_loss_table_scores_the_objective_training_uses():
    """Under ambient training the loss table's loss is the ambient one above t_n (what the proxies
    were trained to lower), the plain one below; without a mitigation that sets the objective, the
    plain DDPM loss as before."""
    import numpy as np

    from pipeline.core.config import parse_params
    from pipeline.train.loss_table import profile_losses
    from pipeline.mitigation import Mitigations
    from pipeline.core.models import build_unet

    p = parse_params({"model": {**arch().model_dump(), "num_train_timesteps": 10}, "data": {"resolution": 8},
                      "eval": {"ddim_steps": 10}, "ambient": {"enabled": True, "timestep": 3}})
    model, schedule = build_unet(p.model, 8, 1, seed=0), build_scheduler(p.model)
    images = torch.rand(6, 1, 8, 8) * 2 - 1
    mitigations = Mitigations(("ambient",), p, 6, (0,))
    positions = np.arange(6)
    objective = lambda x0, pos, t, noise: mitigations.noised(0, x0, pos, t, noise, schedule)  # noqa: E731
    plain = profile_losses(model, images, positions, schedule, 4, seed=1)
    ambient = profile_losses(model, images, positions, schedule, 4, seed=1, objective=objective)
    assert not torch.allclose(plain, ambient)  # some draws are above t_n
    # the same draws, by hand: every (pair, sample) under the ambient pair
    from pipeline.train.loss_table import PROFILE_CHUNK, _draws
    t_all, noise_all = _draws(1, 0, 4, (1, 8, 8), 10)
    t, noise = t_all[:, :6].reshape(-1), noise_all[:, :6].reshape(-1, 1, 8, 8)
    flat = torch.arange(6).repeat(4)
    xt, target = mitigations.noised(0, images[flat], flat, t, noise, schedule)
    with torch.inference_mode():
        by_hand = (model(xt, t).sample - target).pow(2).mean(dim=(1, 2, 3)).view(4, -1).mean(0)
    torch.testing.assert_close(ambient, by_hand)
    assert PROFILE_CHUNK >= 6
