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


PROFILE_CHUNK = 256  # positions whose draws come from one generator: fixed, so a draw never depends on N


def _draws(seed: int, chunk: int, pairs: int, shape: tuple[int, ...], timesteps: int):
    gen = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, chunk]).generate_state(1)[0]))
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
        x0 = images[torch.from_numpy(positions[where])].repeat(pairs, 1, 1, 1)
        t, noise = t_all[:, rows].reshape(-1), noise_all[:, rows].reshape(-1, *images.shape[1:])
        losses = torch.empty(len(t))
        for s in range(0, len(t), batch_size):
            sl = slice(s, s + batch_size)
            pred = model(noise_schedule.add_noise(x0[sl], noise[sl], t[sl]).to(device), t[sl].to(device)).sample
            losses[sl] = (pred.cpu() - noise[sl]).pow(2).mean(dim=(1, 2, 3))
        out[torch.from_numpy(where)] = losses.view(pairs, -1).mean(0)
    model.train()
    return out


def msr_candidates(skip_rate: np.ndarray, cfg: MSRConfig) -> np.ndarray:
    """Positions MSR may move, most-skipped first (ties by position): skip rate >= cfg.skip_rate,
    or the top cfg.fraction when set."""
    order = np.lexsort((np.arange(len(skip_rate)), -skip_rate))
    if cfg.fraction is not None:
        return order[:int(round(cfg.fraction * len(skip_rate)))]
    return order[skip_rate[order] >= cfg.skip_rate]


def size_bounds(n: int, k: int, max_imbalance: float) -> tuple[int, int]:
    nominal = n / k
    return max(1, math.floor((1 - max_imbalance) * nominal)), math.ceil((1 + max_imbalance) * nominal)


def _next_reads(candidates: np.ndarray, shard: np.ndarray, sizes: np.ndarray, lo: int,
                losses: np.ndarray, at_least: int) -> np.ndarray:
    """Unscored rows for redistribute to score next: of each shard, as many of its next unscored
    candidates as could still leave it (size - lo, less its scored candidates still ahead). A shard's
    room shrinks only when one of its own candidates moves out, so each of these is read. Topped up
    to `at_least` rows with the next unscored candidates of shards that can still give: those may
    go unread, but one call per proxy costs less than several small ones."""
    unscored = np.isnan(losses[candidates]).any(axis=1)
    sure, room = [], {}
    for s in range(len(sizes)):
        mine = shard[candidates] == s
        room[s] = sizes[s] - lo - int((mine & ~unscored).sum())
        sure.append(candidates[mine & unscored][:max(0, room[s])])
    picks = set(np.concatenate(sure).tolist())
    extra = [i for i in candidates[unscored].tolist() if room[shard[i]] > 0 and i not in picks]
    return np.array(sorted(picks | set(extra[:max(0, at_least - len(picks))])), dtype=np.int64)


def redistribute(shard: np.ndarray, skip_rate: np.ndarray, losses: np.ndarray, cfg: MSRConfig,
                 score=None, score_at_least: int = 1) -> tuple[np.ndarray, list[dict]]:
    """Move memorization-prone samples (high AGC skip rate) to the shard whose proxy has the highest
    loss on them, i.e. fitted them least. losses[i, k] is sample i's loss under proxy k; only the
    rows of candidates whose shard can still give are read. Rows left NaN are filled in place by
    `score(positions) -> rows` when first needed, in batches of at least `score_at_least` rows
    (where that many remain), so a caller scores little more than the rows that are read. Shard
    sizes stay within size_bounds; a sample whose own proxy already has the highest loss stays.
    Returns the new assignment (a copy: every sample in exactly one shard) and the moves."""
    n, k = losses.shape
    lo, hi = size_bounds(n, k, cfg.max_imbalance)
    shard = shard.copy()
    sizes = np.bincount(shard, minlength=k)
    candidates = msr_candidates(skip_rate, cfg)
    moves = []
    for j, i in enumerate(candidates):
        src = shard[i]
        if sizes[src] <= lo:
            continue
        if np.isnan(losses[i]).any():
            if score is None:
                raise ValueError(f"no losses for candidate position {i} and no score function")
            batch = _next_reads(candidates[j:], shard, sizes, lo, losses, score_at_least)
            losses[batch] = score(batch)
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
