"""DP-SGD (Abadi et al. 2016) through Opacus: every sample's gradient is clipped to
dp.max_grad_norm, Gaussian noise of sd dp.noise_multiplier x dp.max_grad_norm is added to their
sum, and the sum is divided by the batch size; the optimizer (Adam) then steps on that. The
epsilon spent, at dp.delta, comes from Opacus's RDP accountant.

Where it plugs in: DP changes how a step turns the backward pass into an update, which none of
the per-sample hooks (transform, keep, observe) can express. Rather than a branch in the training
loop, the `attach` hook wraps each proxy once, when it is built: Opacus's GradSampleModule hooks
the UNet's layers so that every backward pass also leaves per-sample gradients (p.grad_sample),
and proxy.optimizer becomes an Opacus DPOptimizer around the proxy's Adam. The loop is unchanged:
it calls proxy.optimizer.step() as always, and the DPOptimizer clips, noises and averages first.
proxy.model stays the plain UNet (the hooks sit on its layers), so averaging, checkpoints, EMA and
saved models see the same state dict; the DPOptimizer passes state_dict, param_groups (which the
LR schedule sets) and zero_grad through to the Adam it wraps. train.grad_clip's whole-batch clip
still runs on the plain gradient, which the DPOptimizer then replaces: it has no effect here.

Accounting. The loop draws fixed-size batches from successive random permutations (the
baseline's data order), not the Poisson sampling RDP's subsampled-Gaussian bound assumes; the
epsilon is computed at sampling rate q = batch_size / N as Opacus does for shuffled batches, a
common approximation rather than a proven bound for shuffling. params refuse a batch size that
does not divide N, so no batch holds a sample twice. A duplicated image (data.duplicates) is
several samples: the guarantee is per sample, an image with c copies gets group privacy of c.
What else params refuse, and why, is in pipeline/core/config.py (Params._dp_fits)."""
from __future__ import annotations

import math
import warnings

from pipeline.core.config import ConfigError, DPConfig
from pipeline.mitigation.base import Context, Mitigation

EPSILON = "dp_epsilon"


def make_private(proxy, noise_multiplier: float, max_grad_norm: float, batch_size: int):
    """Hook proxy.model's layers for per-sample gradients and wrap proxy.optimizer in a DPOptimizer
    whose noise is drawn from the proxy's generator (reproducible, and saved with the proxy).
    Returns the GradSampleModule that holds the hooks."""
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer
    from opacus.validators import ModuleValidator

    problems = ModuleValidator.validate(proxy.model, strict=False)
    if problems:
        what = "; ".join(" ".join(str(p).split()) for p in problems)
        raise ConfigError(f"dp.enabled: the model has layers Opacus cannot train privately ({what}); "
                          "use a model without them (model.init_from)")
    # Opacus hooks whole modules; torch warns that their inputs need no gradient (the noisy images): harmless
    warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed with "
                                              "respect to module outputs")
    hooks = GradSampleModule(proxy.model, batch_first=True, loss_reduction="mean")
    proxy.optimizer = DPOptimizer(proxy.optimizer, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                                  expected_batch_size=batch_size, loss_reduction="mean", generator=proxy.generator)
    return hooks


def epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    """The epsilon of `steps` subsampled-Gaussian steps at (noise_multiplier, sample_rate), at delta (RDP)."""
    from opacus.accountants import RDPAccountant

    if steps == 0:
        return 0.0
    accountant = RDPAccountant()
    accountant.history = [(noise_multiplier, sample_rate, steps)]
    return float(accountant.get_epsilon(delta))


class DPSGD(Mitigation):
    """Private steps for every proxy (params allow one: iet.shards = 1); the epsilon spent so far
    after each round, and at the end."""

    def __init__(self, cfg: DPConfig, ctx: Context):
        super().__init__(cfg, ctx)
        self.proxies, self.hooks = {}, {}

    def attach(self, k, proxy):
        self.hooks[k] = make_private(proxy, self.cfg.noise_multiplier, self.cfg.max_grad_norm, self.ctx.batch_size)
        self.proxies[k] = proxy

    def _epsilon(self) -> dict[str, float]:
        if not self.proxies:  # a process without proxies reports nothing
            return {}
        steps = max(proxy.step for proxy in self.proxies.values())
        value = epsilon(self.cfg.noise_multiplier, self.ctx.batch_size / self.ctx.samples, steps, self.cfg.delta)
        return {EPSILON: value} if math.isfinite(value) else {}

    def round_metrics(self):
        return self._epsilon()

    def summary(self):
        return self._epsilon()
