"""Threshold-aware augmentation: this project's design of the TAA idea from the IET-AGC+ paper
(docs/method.md#taa; its code is not public). Instead of only skipping samples that AGC finds too
easy, augment them when drawn, more strongly the further their loss ratio l / bank[t] falls below
the threshold, so that the model is never shown the same pixels often enough to copy them."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from pipeline.core.config import TAAConfig, Transforms
from pipeline.mitigation.base import Context, Mitigation, Step


def update_strength(strength: torch.Tensor, losses: torch.Tensor, bank_t: torch.Tensor,
                    tau: float, cfg: TAAConfig) -> torch.Tensor:
    """New strengths for the drawn samples. bank_t is bank[t_i] before this step's update.
    Below the threshold the strength rises in proportion to the shortfall; otherwise it decays.
    A zero bank (timestep never seen) gives no evidence either way: decay."""
    ratio = torch.where(bank_t > 0, losses.detach() / bank_t.clamp(min=1e-12), torch.full_like(losses, float("inf")))
    shortfall = tau + cfg.margin - ratio
    raised = (strength + cfg.rise * shortfall).clamp(0, 1)
    return torch.where(shortfall > 0, raised, strength * cfg.decay)


def augment(x: torch.Tensor, strength: torch.Tensor, cfg: Transforms, generator: torch.Generator | None = None) -> torch.Tensor:
    """Label-preserving augmentation of images in [-1, 1], per sample scaled by strength in [0, 1].
    Strength 0 returns the sample unchanged, bit for bit."""
    n, _, h, w = x.shape
    s = strength.to(x.device, x.dtype)
    u = torch.rand(n, 5, generator=generator, device=x.device, dtype=x.dtype)
    out = x
    if cfg.flip:
        flip = u[:, 0] < s
        out = torch.where(flip[:, None, None, None], out.flip(-1), out)
    if cfg.max_shift > 0:
        m = cfg.max_shift
        dy = torch.round((2 * u[:, 1] - 1) * s * m).long()
        dx = torch.round((2 * u[:, 2] - 1) * s * m).long()
        # Integer translation by indexing a padded copy: exact, and background (-1) fills the gap.
        padded = F.pad(out, (m, m, m, m), value=-1.0)
        rows = torch.arange(h, device=x.device)[None, :] + m - dy[:, None]   # [n, h]
        cols = torch.arange(w, device=x.device)[None, :] + m - dx[:, None]   # [n, w]
        idx = torch.arange(n, device=x.device)[:, None, None]
        out = padded.permute(0, 2, 3, 1)[idx, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
    if cfg.jitter > 0:
        offset = (2 * u[:, 3] - 1) * s * cfg.jitter
        out = (out + offset[:, None, None, None]).clamp(-1, 1)
    return out.contiguous()


class TAA(Mitigation):
    """One strength per training sample, shared by the proxies (a sample is drawn only by its
    shard's proxy), raised by AGC's evidence that the sample is too easy."""
    def __init__(self, cfg: TAAConfig, ctx: Context):
        super().__init__(cfg, ctx)
        self.agc = ctx.others["agc"]
        self.strength = torch.zeros(ctx.samples, device=ctx.device)

    def transform(self, k, x0, positions, generator):
        return augment(x0, self.strength[positions], self.cfg, generator)

    def observe(self, k: int, step: Step) -> None:
        # AGC observes first (registry order); its reference is the bank the mask compared against
        self.strength[step.positions] = update_strength(self.strength[step.positions], step.losses,
                                                        self.agc.reference, self.agc.cfg.tau, self.cfg)

    def sync(self, ranks, owned):
        if ranks.world > 1:
            ranks.sum_(self.strength.mul_(owned))

    def state(self, k):
        return {"strength": self.strength} if k is None else {}

    def load_state(self, tensors, k):
        if k is None:
            self.strength = tensors["strength"].to(self.ctx.device)

    def round_metrics(self):
        return {"taa_strength_mean": float(self.strength.mean())}
