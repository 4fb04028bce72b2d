"""IET's ensemble operations: sharding, the weighted average of proxies, and the loss profile of
samples under a proxy (memory-sample redistribution itself is pipeline/mitigation/msr.py)."""
from __future__ import annotations

import numpy as np
import torch
from diffusers import DDPMScheduler, UNet2DModel

from pipeline.seeds import PROFILE_DRAWS, derived_seed


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


PROFILE_CHUNK = 256  # positions whose draws come from one generator: fixed, so a draw never depends on N


def _draws(seed: int, chunk: int, pairs: int, shape: tuple[int, ...], timesteps: int):
    gen = torch.Generator().manual_seed(derived_seed(seed, PROFILE_DRAWS, chunk))
    t = torch.randint(0, timesteps, (pairs, PROFILE_CHUNK), generator=gen)
    return t, torch.randn((pairs, PROFILE_CHUNK, *shape), generator=gen)


@torch.inference_mode()
def profile_losses(model: UNet2DModel, images: torch.Tensor, positions: np.ndarray,
                   noise_schedule: DDPMScheduler, pairs: int, seed: int, batch_size: int = 512) -> torch.Tensor:
    """Mean denoising loss of images[positions] at `pairs` (t, noise) draws. A sample's draws depend
    only on (seed, its position), so every proxy scores it at the same draws whichever subset of the
    training set that proxy is asked to score: the losses are comparable across proxies."""
    model.eval()
    device = next(model.parameters()).device
    positions = np.asarray(positions, dtype=np.int64)
    out = torch.zeros(len(positions))
    for chunk in np.unique(positions // PROFILE_CHUNK):
        where = np.flatnonzero(positions // PROFILE_CHUNK == chunk)
        rows = torch.from_numpy(positions[where] % PROFILE_CHUNK)
        t_all, noise_all = _draws(seed, int(chunk), pairs, tuple(images.shape[1:]),
                                  noise_schedule.config.num_train_timesteps)
        # every (pair, sample) in one flat batch: big no-grad batches are the cheap way on a CPU
        # the draws are made on the CPU (the same on every device), then everything goes to the model
        x0 = images[torch.from_numpy(positions[where]).to(images.device)].to(device).repeat(pairs, 1, 1, 1)
        t = t_all[:, rows].reshape(-1).to(device)
        noise = noise_all[:, rows].reshape(-1, *images.shape[1:]).to(device)
        losses = torch.empty(len(t), device=device)
        for s in range(0, len(t), batch_size):
            sl = slice(s, s + batch_size)
            pred = model(noise_schedule.add_noise(x0[sl], noise[sl], t[sl]), t[sl]).sample
            losses[sl] = (pred - noise[sl]).pow(2).mean(dim=(1, 2, 3))
        losses = losses.cpu()
        out[torch.from_numpy(where)] = losses.view(pairs, -1).mean(0)
    model.train()
    return out
