"""IET's ensemble operations: the split of the training set into shards and the weighted average
of the proxies (the loss table is pipeline/loss_table.py, memory-sample redistribution
pipeline/mitigation/msr.py)."""
from __future__ import annotations

import numpy as np
import torch


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
