"""Anti-gradient control (P1, official code): skip samples whose loss falls well below the
running loss of their timestep, because such samples are already fitted and further gradient
on them is what drives memorization."""
from __future__ import annotations

import torch
from pipeline.config import AGCConfig
from pipeline.mitigation.base import Context, Mitigation, Step


def keep_mask(losses: torch.Tensor, timesteps: torch.Tensor, bank: torch.Tensor, tau: float) -> torch.Tensor:
    """Keep sample i iff l_i >= tau * bank[t_i]. A fresh bank (zeros) keeps everything."""
    return losses >= tau * bank[timesteps]


def update_bank(bank: torch.Tensor, timesteps: torch.Tensor, losses: torch.Tensor, decay: float) -> torch.Tensor:
    """Vectorised form of the official per-sample loop
        for i: bank[t_i] = decay * bank[t_i] + (1 - decay) * l_i
    When a timestep repeats in the batch the loop applies the updates in batch order, so the
    j-th of k occurrences is weighted by (1 - decay) * decay**(k - 1 - j) and the old value by
    decay**k."""
    t = timesteps.long()
    losses = losses.detach().to(bank.dtype)
    # not torch.bincount: on CUDA it reads max(t) back to the host to size its output
    counts = torch.zeros(bank.numel(), dtype=torch.long, device=t.device).index_add_(0, t, torch.ones_like(t))
    order = torch.argsort(t, stable=True)
    group_start = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(t)
    rank[order] = torch.arange(t.numel(), device=t.device) - group_start[t[order]]
    weights = (1 - decay) * decay ** (counts[t] - 1 - rank).to(bank.dtype)
    decayed = bank * decay ** counts.to(bank.dtype)
    return decayed.index_add(0, t, weights * losses)


class AGC(Mitigation):
    """Per proxy a memory bank of the running loss per timestep; the keep mask compares each
    sample's loss with it. The bank stays with its proxy: IET does not average it."""
    def __init__(self, cfg: AGCConfig, ctx: Context):
        super().__init__(cfg, ctx)
        self.bank = {k: torch.zeros(ctx.timesteps, device=ctx.device) for k in ctx.proxies}
        # bank[t_i] of the last observed step before its update: what the mask compared against
        self.reference = torch.zeros(0, device=ctx.device)
        self.bank_means: dict[int, float] = {}

    def keep(self, k, losses, timesteps):
        return keep_mask(losses, timesteps, self.bank[k], self.cfg.tau)

    def observe(self, k: int, step: Step) -> None:
        self.reference = self.bank[k][step.timesteps]
        self.bank[k] = update_bank(self.bank[k], step.timesteps, step.losses, self.cfg.bank_decay)

    def sync(self, ranks, owned):
        self.bank_means = {k: v for part in ranks.gather({k: b.mean().item() for k, b in self.bank.items()})
                           for k, v in part.items()}

    def state(self, k):
        return {} if k is None else {"bank": self.bank[k]}

    def load_state(self, tensors, k):
        if k is not None:
            self.bank[k] = tensors["bank"].to(self.ctx.device)

    def curve(self, k):
        return {"bank_mean": self.bank[k].mean().item()}

    def round_metrics(self):
        return {"bank_mean": float(sum(self.bank_means.values()) / len(self.bank_means))}
