"""Anti-gradient control (the IET-AGC paper, Liu et al. ECCV 2024, and its official code;
docs/method.md#agc): skip samples whose loss falls well below the running loss of their timestep,
because such samples are already fitted and further gradient on them is what drives memorization."""
from __future__ import annotations

import torch
from pipeline.core.config import AGCConfig
from pipeline.mitigation.base import Context, Mitigation, Step


def keep_mask(losses: torch.Tensor, reference: torch.Tensor, tau: float) -> torch.Tensor:
    """Keep sample i iff l_i >= tau * ref(t_i) (`reference`: ref at each sample's timestep, the
    official bank[t_i]). A fresh bank (zeros) keeps everything."""
    return losses >= tau * reference


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


class OfficialBank:
    """The official reference: per timestep a running loss, zero at the start, never reset. At the
    official scale (about 5,000 updates per timestep and proxy) it tracks the current mean loss;
    at a few hundred steps it remembers the start of training (docs/method.md#small-scale)."""

    def __init__(self, timesteps: int, device, decay: float):
        self.bank, self.decay = torch.zeros(timesteps, device=device), decay

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        return self.bank[t]

    def update(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        self.bank = update_bank(self.bank, t, losses, self.decay)

    def state(self) -> dict[str, torch.Tensor]:
        return {"bank": self.bank}

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        self.bank = tensors["bank"].to(self.bank.device)


class PooledReference:
    """This project's reference (docs/method.md#agc-variants): timesteps pooled into B equal bins, per bin
    an EMA of every draw's loss with a short memory d_p and its draw count n, read bias-corrected as
    Adam's moments are: ref(t) = m[b(t)] / (1 - d_p ** n[b(t)]). A bin never drawn reads 0."""

    def __init__(self, timesteps: int, device, bins: int, decay: float):
        self.timesteps, self.decay = timesteps, decay
        self.mean = torch.zeros(bins, device=device)
        self.count = torch.zeros(bins, dtype=torch.long, device=device)

    def _bins(self, t: torch.Tensor) -> torch.Tensor:
        return t.long() * len(self.mean) // self.timesteps

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        b = self._bins(t)
        seen = self.count[b] > 0
        corrected = self.mean[b] / (1 - self.decay ** self.count[b].clamp(min=1).to(self.mean.dtype))
        return torch.where(seen, corrected, torch.zeros_like(corrected))

    def update(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        b = self._bins(t)
        self.mean = update_bank(self.mean, b, losses, self.decay)  # batch order, repeated bins included
        self.count = self.count.index_add(0, b, torch.ones_like(b))

    def state(self) -> dict[str, torch.Tensor]:
        return {"pooled_mean": self.mean, "pooled_count": self.count}

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        self.mean, self.count = (tensors[k].to(self.mean.device) for k in ("pooled_mean", "pooled_count"))


class ImageScore:
    """Per training sample an EMA of its relative loss r = l / ref(t) over its own draws, with its
    draw count, read bias-corrected: s_hat = s / (1 - d_s ** n). The sample is skipped while
    s_hat < tau once it has been drawn at least `min_draws` times. A draw whose reference is 0 (no
    evidence yet) leaves the score as it is."""

    def __init__(self, samples: int, device, decay: float, min_draws: int):
        self.decay, self.min_draws = decay, min_draws
        self.score = torch.zeros(samples, device=device)
        self.draws = torch.zeros(samples, dtype=torch.long, device=device)

    def corrected(self, positions: torch.Tensor) -> torch.Tensor:
        n = self.draws[positions].clamp(min=1).to(self.score.dtype)
        return self.score[positions] / (1 - self.decay ** n)

    def keep(self, positions: torch.Tensor, tau: float) -> torch.Tensor:
        return (self.draws[positions] < self.min_draws) | (self.corrected(positions) >= tau)

    def update(self, positions: torch.Tensor, ratio: torch.Tensor) -> None:
        """A sample occurs at most once in a batch (batches are drawn without replacement)."""
        seen = torch.isfinite(ratio)
        new = self.decay * self.score[positions] + (1 - self.decay) * torch.where(seen, ratio, 0.0)
        self.score[positions] = torch.where(seen, new, self.score[positions])
        self.draws[positions] += seen.long()


class AGC(Mitigation):
    """Per proxy a reference loss per timestep (`agc.reference`: the official bank, or pooled); the
    keep mask compares each draw's loss with it (`agc.score: draw`, official) or each image's smoothed
    relative loss (`image`). The reference stays with its proxy: IET does not average it; the image
    score is the sample's and moves with it under MSR."""
    def __init__(self, cfg: AGCConfig, ctx: Context):
        super().__init__(cfg, ctx)
        self.refs = {k: self._reference(ctx) for k in ctx.proxies}
        self.image = ImageScore(ctx.samples, ctx.device, cfg.image_decay, cfg.min_draws) if cfg.score == "image" else None
        self.steps = dict.fromkeys(ctx.proxies, 0)  # the pooled reference masks nothing during warmup
        # ref(t_i) of the last observed step before its update: what the mask compared against (TAA reads it)
        self.reference = torch.zeros(0, device=ctx.device)
        self.bank_means: dict[int, float] = {}

    def _reference(self, ctx: Context):
        if self.cfg.reference == "pooled":
            return PooledReference(ctx.timesteps, ctx.device, self.cfg.bins, self.cfg.pooled_decay)
        return OfficialBank(ctx.timesteps, ctx.device, self.cfg.bank_decay)

    def keep(self, k, losses, timesteps, positions):
        if self.cfg.reference == "pooled" and self.steps[k] < self.ctx.warmup_steps:
            return torch.ones_like(losses, dtype=torch.bool)
        if self.image is not None:
            return self.image.keep(positions, self.cfg.tau)
        return keep_mask(losses, self.refs[k](timesteps), self.cfg.tau)

    def observe(self, k: int, step: Step) -> None:
        self.reference = self.refs[k](step.timesteps)
        if self.image is not None:
            ratio = torch.where(self.reference > 0, step.losses / self.reference.clamp(min=1e-12),
                                torch.full_like(step.losses, float("inf")))
            self.image.update(step.positions, ratio)
        self.refs[k].update(step.timesteps, step.losses)
        self.steps[k] += 1

    def sync(self, ranks, owned):
        self.bank_means = {k: v for part in ranks.gather({k: self._mean(k) for k in self.refs}) for k, v in part.items()}
        if self.image is not None and ranks.world > 1:
            ranks.sum_(self.image.score.mul_(owned))
            ranks.sum_(self.image.draws.mul_(owned.long()))

    def _mean(self, k: int) -> float:
        return self.refs[k](torch.arange(self.ctx.timesteps, device=self.ctx.device)).mean().item()

    def state(self, k):
        if k is None:
            return {"image_score": self.image.score, "image_draws": self.image.draws} if self.image else {}
        return {**self.refs[k].state(), "steps": torch.tensor(self.steps[k])}

    def load_state(self, tensors, k):
        if k is None:
            if self.image is not None:
                self.image.score, self.image.draws = (tensors[n].to(self.ctx.device) for n in ("image_score", "image_draws"))
        else:
            self.refs[k].load(tensors)
            self.steps[k] = int(tensors["steps"]) if "steps" in tensors else 0

    def curve(self, k):
        return {"bank_mean": self._mean(k)}

    def round_metrics(self):
        if not self.bank_means:  # a profile stage's process: the train stage recorded it
            return {}
        return {"bank_mean": float(sum(self.bank_means.values()) / len(self.bank_means))}
