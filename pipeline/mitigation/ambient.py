"""Ambient high-noise training (Shah, Kalavasis, Klivans, Daras, "Does Generation Require
Memorization? Creative Diffusion Models using Ambient Diffusion", ICML 2025), in this project's DDPM
terms (docs/method.md#references).

Each training image x0 gets one fixed noisy copy x_n = sqrt(abar_n) x0 + sqrt(1 - abar_n) eta (eta
drawn once per sample, seeded). At t <= t_n the model learns as usual from x0. Above t_n it never
sees x0: x_t = sqrt(abar_t / abar_n) x_n + sqrt(1 - abar_t / abar_n) eps, and its clean estimate
x0_hat(x_t) is asked to give the posterior mean of x_n given x_t and x0:
    loss = || c1 x0_hat + c2 x_t - x_n ||^2,
    c1 = sqrt(abar_n) (1 - abar_t / abar_n) / (1 - abar_t),  c2 = sqrt(abar_t / abar_n) (1 - abar_n) / (1 - abar_t),
whose minimiser is x0_hat = E[x0 | x_t] without x0 ever being shown.

Weighting of the two regimes as in the authors' code (giannisdaras/ambient-omni, AmbientEDMLoss:
the x_tn-prediction error times sigma_t^4 / (sigma_t^2 - sigma_tn^2)^2, i.e. the same weight the
clean loss gives the implied x0 error): here the high-noise loss is written as the plain epsilon
loss || pred - target ||^2 with the target whose x0 error it implies, so both regimes weigh an x0
error alike. With x0_hat = (x_t - s_t pred) / a_t (a_t = sqrt(abar_t), s_t = sqrt(1 - abar_t)):
    c1 x0_hat + c2 x_t - x_n = -(c1 s_t / a_t) (pred - target),
    target = (a_t / (c1 s_t)) ((c1 / a_t + c2) x_t - x_n)."""
from __future__ import annotations

import torch

from pipeline.core.config import AmbientConfig
from pipeline.mitigation.base import Context, Mitigation


def ambient_objective(x0: torch.Tensor, eta: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
                      alphas_cumprod: torch.Tensor, t_n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_t, target) of every sample: the plain DDPM pair at t <= t_n, the ambient pair above."""
    shape = (-1,) + (1,) * (x0.dim() - 1)
    abar = alphas_cumprod.to(x0.device, torch.float64)
    abar_t, abar_n = abar[t].view(shape), abar[t_n]
    a_t, s_t = abar_t.sqrt(), (1 - abar_t).sqrt()
    x0, eta, noise = x0.double(), eta.double(), noise.double()
    clean_xt = a_t * x0 + s_t * noise
    x_n = abar_n.sqrt() * x0 + (1 - abar_n).sqrt() * eta
    ratio = (abar_t / abar_n).clamp(max=1)  # below t_n the ratio exceeds 1; those samples take the clean pair
    ambient_xt = ratio.sqrt() * x_n + (1 - ratio).sqrt() * noise
    c1 = abar_n.sqrt() * (1 - ratio) / (1 - abar_t)
    c2 = ratio.sqrt() * (1 - abar_n) / (1 - abar_t)
    high = (t > t_n).view(shape)
    safe_c1 = torch.where(high, c1, torch.ones_like(c1))  # c1 = 0 at t = t_n: never divided there
    target = (a_t / (safe_c1 * s_t)) * ((safe_c1 / a_t + c2) * ambient_xt - x_n)
    xt = torch.where(high, ambient_xt, clean_xt)
    return xt.float(), torch.where(high, target, noise).float()


class Ambient(Mitigation):
    """One fixed noise eta per training sample (the same on every proxy and every resume: drawn from
    the run's seed, so no state to save), and the objective above."""

    def __init__(self, cfg: AmbientConfig, ctx: Context):
        super().__init__(cfg, ctx)
        self.eta: torch.Tensor | None = None  # made at the first step, when the image shape is known

    def noised(self, k, x0, positions, timesteps, noise, schedule):
        if self.eta is None:
            gen = torch.Generator().manual_seed(self.ctx.seed)
            self.eta = torch.randn((self.ctx.samples, *x0.shape[1:]), generator=gen).to(x0.device)
        return ambient_objective(x0, self.eta[positions], timesteps, noise, schedule.alphas_cumprod, self.cfg.timestep)
