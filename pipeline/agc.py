"""Anti-gradient control (P1, official code): skip samples whose loss falls well below the
running loss of their timestep, because such samples are already fitted and further gradient
on them is what drives memorization."""
from __future__ import annotations

import torch


def keep_mask(losses: torch.Tensor, timesteps: torch.Tensor, bank: torch.Tensor, tau: float) -> torch.Tensor:
    """Keep sample i iff l_i >= tau * bank[t_i]. A fresh bank (zeros) keeps everything."""
    return losses >= tau * bank[timesteps]


def masked_loss(losses: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Mean over kept samples; skipped samples get zero weight, not a negated gradient.
    An all-skipped batch yields a zero loss that still lets the optimizer and EMA step."""
    return (losses * keep).sum() / keep.sum().clamp(min=1)


def update_bank(bank: torch.Tensor, timesteps: torch.Tensor, losses: torch.Tensor, decay: float) -> torch.Tensor:
    """Vectorised form of the official per-sample loop
        for i: bank[t_i] = decay * bank[t_i] + (1 - decay) * l_i
    When a timestep repeats in the batch the loop applies the updates in batch order, so the
    j-th of k occurrences is weighted by (1 - decay) * decay**(k - 1 - j) and the old value by
    decay**k."""
    t = timesteps.long()
    losses = losses.detach().to(bank.dtype)
    counts = torch.bincount(t, minlength=bank.numel())
    order = torch.argsort(t, stable=True)
    group_start = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(t)
    rank[order] = torch.arange(t.numel(), device=t.device) - group_start[t[order]]
    weights = (1 - decay) * decay ** (counts[t] - 1 - rank).to(bank.dtype)
    decayed = bank * decay ** counts.to(bank.dtype)
    return decayed.index_add(0, t, weights * losses)
