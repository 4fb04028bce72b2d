"""IET's ensemble operations: sharding, the weighted average of proxies, and memory-sample
redistribution (MSR: this project's design of P2's idea, see the README)."""
from __future__ import annotations

import math

import numpy as np
import torch
from diffusers import DDPMScheduler, UNet2DModel

from pipeline.config import MSRConfig


def split_shards(labels: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Shard index per training-set position: random, seeded, balanced by class where labels
    exist (dealing class-sorted positions round-robin keeps each class spread evenly and every
    shard size within one of N/K)."""
    rng = np.random.default_rng(seed)
    order = np.lexsort((rng.permutation(len(labels)), labels))
    shard = np.empty(len(labels), dtype=np.int64)
    shard[order] = np.arange(len(labels)) % k
    return shard


def aggregate(states: list[dict[str, torch.Tensor]], weights: list[float]) -> dict[str, torch.Tensor]:
    """Shard-size-weighted mean of floating tensors; integer tensors (counters) come from the first."""
    w = torch.tensor(weights, dtype=torch.float64)
    w = w / w.sum()
    out = {}
    for key, first in states[0].items():
        if first.is_floating_point():
            stacked = torch.stack([s[key].to(torch.float64) for s in states])
            out[key] = torch.tensordot(w, stacked, dims=1).to(first.dtype)
        else:
            out[key] = first.clone()
    return out


@torch.no_grad()
def profile_losses(model: UNet2DModel, images: torch.Tensor, noise_schedule: DDPMScheduler,
                   pairs: int, seed: int, batch_size: int = 512) -> torch.Tensor:
    """Mean denoising loss of every image at `pairs` fixed (t, noise) draws. The same seed gives
    every proxy the same draws, so their losses on a sample are comparable."""
    model.eval()
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    n = images.shape[0]
    total = torch.zeros(n)
    for _ in range(pairs):
        t_all = torch.randint(0, noise_schedule.config.num_train_timesteps, (n,), generator=gen)
        noise_all = torch.randn(images.shape, generator=gen)
        for s in range(0, n, batch_size):
            x0, noise, t = images[s:s + batch_size], noise_all[s:s + batch_size], t_all[s:s + batch_size]
            pred = model(noise_schedule.add_noise(x0, noise, t).to(device), t.to(device)).sample.cpu()
            total[s:s + batch_size] += (pred - noise).pow(2).mean(dim=(1, 2, 3))
    model.train()
    return total / pairs


def size_bounds(n: int, k: int, max_imbalance: float) -> tuple[int, int]:
    nominal = n / k
    return max(1, math.floor((1 - max_imbalance) * nominal)), math.ceil((1 + max_imbalance) * nominal)


def redistribute(shard: np.ndarray, skip_rate: np.ndarray, losses: np.ndarray, cfg: MSRConfig
                 ) -> tuple[np.ndarray, list[dict]]:
    """Move memorization-prone samples (high AGC skip rate) to the shard whose proxy has the highest
    loss on them, i.e. fitted them least. losses[i, k] is sample i's loss under proxy k. Shard sizes
    stay within size_bounds; a sample whose own proxy already has the highest loss stays.
    Returns the new assignment (a copy: every sample in exactly one shard) and the moves."""
    n, k = losses.shape
    lo, hi = size_bounds(n, k, cfg.max_imbalance)
    shard = shard.copy()
    sizes = np.bincount(shard, minlength=k)
    if cfg.fraction is not None:
        count = int(round(cfg.fraction * n))
        candidates = np.lexsort((np.arange(n), -skip_rate))[:count]
    else:
        candidates = np.flatnonzero(skip_rate >= cfg.skip_rate)
        candidates = candidates[np.lexsort((candidates, -skip_rate[candidates]))]
    moves = []
    for i in candidates:
        src = shard[i]
        if sizes[src] <= lo:
            continue
        for dst in np.lexsort((np.arange(k), -losses[i])):  # highest loss first, ties by index
            if dst == src:
                break
            if sizes[dst] < hi:
                shard[i] = dst
                sizes[src] -= 1
                sizes[dst] += 1
                moves.append({"position": int(i), "from": int(src), "to": int(dst),
                              "skip_rate": float(skip_rate[i]), "loss_from": float(losses[i, src]),
                              "loss_to": float(losses[i, dst])})
                break
    return shard, moves
