"""IET's ensemble operations: the split of the training set into shards and the weighted average
of the proxies (the loss table is pipeline/train/loss_table.py, memory-sample redistribution
pipeline/mitigation/msr.py)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from pipeline.core.io import read_json, staged_folder
from pipeline.core.layout import TRAIN_INFO, checkpoint_file, midpoint_file, proxy_file


def split_shards(labels: np.ndarray, k: int, seed: int, groups: np.ndarray | None = None) -> np.ndarray:
    """Shard index per training-set position: random, seeded, balanced by class where labels
    exist (dealing class-sorted positions round-robin keeps each class spread evenly and every
    shard size within one of N/K). With `groups` (a group id per position, iet.split: groups) every
    group lands whole in one shard, so one proxy sees a duplicated image and the average dilutes
    what it memorized (IET's premise): groups, largest first (ties in seeded random order), each go
    to the smallest shard, the one holding fewest of its label among equals."""
    rng = np.random.default_rng(seed)
    if groups is None:
        order = np.lexsort((rng.permutation(len(labels)), labels))
        shard = np.empty(len(labels), dtype=np.int64)
        shard[order] = np.arange(len(labels)) % k
        return shard
    sizes = np.bincount(groups)
    classes = np.unique(labels, return_inverse=True)[1]
    by_class = np.zeros((k, classes.max() + 1), dtype=np.int64)
    totals = np.zeros(k, dtype=np.int64)
    shard_of_group = np.empty(len(sizes), dtype=np.int64)
    first = {int(g): i for i, g in reversed(list(enumerate(groups)))}  # a group's label: its first member's
    for g in np.lexsort((rng.permutation(len(sizes)), -sizes)):
        label = classes[first[int(g)]]
        s = int(np.lexsort((by_class[:, label], totals))[0])
        shard_of_group[g] = s
        totals[s] += sizes[g]
        by_class[s, label] += sizes[g]
    return shard_of_group[groups]


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


def average_round(train: Path, out: Path) -> None:
    """The aggregate stage of a round: from its train folder, the weighted mean of the proxies'
    end-of-round weights (aggregated), of their EMA weights (aggregated_ema) and of each mid-round
    checkpoint's weights (checkpoint_JJ), with the weights the train stage wrote (the shard sizes,
    or what a mitigation weighs by: the authors' ring MSR takes the plain mean)."""
    info = read_json(train / TRAIN_INFO)
    shards, weights = info["shards"], info["aggregation_weights"]
    states = [load_file(str(train / proxy_file(k))) for k in range(shards)]
    ends = [{key[6:]: v for key, v in s.items() if key.startswith("model.")} for s in states]
    emas = [{key[4:]: v for key, v in s.items() if key.startswith("ema.")} for s in states]
    with staged_folder(out) as tmp:
        for j in range(1, info["checkpoints_per_round"]):
            mids = [load_file(str(train / midpoint_file(j, k))) for k in range(shards)]
            save_file(aggregate(mids, weights), str(tmp / checkpoint_file(j)))
        save_file(aggregate(emas, weights), str(tmp / "aggregated_ema.safetensors"))
        save_file(aggregate(ends, weights), str(tmp / "aggregated.safetensors"))  # last: it marks the folder done
