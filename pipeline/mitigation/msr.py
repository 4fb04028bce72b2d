"""Memory-sample redistribution: this project's design of the IET-AGC+ paper's idea (neither official
repository has it; docs/method.md#msr). Samples that AGC skips often are the ones their proxy fits too easily;
after each round they move to the shard whose proxy fits them least, so that no proxy sees them
long enough to copy them."""
from __future__ import annotations

import math
import numpy as np

from pipeline.core.config import MSRConfig
from pipeline.mitigation.base import Mitigation, RoundEnd

# Candidates scored per on-demand call, at least: a UNet forward has a fixed cost of about 15 ms on a
# CPU, the compute of ~5 images, so one call per proxy beats several small ones.
PROFILE_AT_LEAST = 32


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
                 score=None, score_at_least: int = 1, groups: np.ndarray | None = None) -> tuple[np.ndarray, list[dict]]:
    """Move memorization-prone samples (high AGC skip rate) to the shard whose proxy has the highest
    loss on them, i.e. fitted them least. losses[i, k] is sample i's loss under proxy k; only the
    rows of candidates whose shard can still give are read. Rows left NaN are filled in place by
    `score(positions) -> rows` when first needed, in batches of at least `score_at_least` rows
    (where that many remain), so a caller scores little more than the rows that are read. Shard
    sizes stay within size_bounds; a sample whose own proxy already has the highest loss stays.
    With `groups` (iet.split: groups) a candidate moves with every member of its group in its shard,
    so groups stay whole. Returns the new assignment (a copy: every sample in exactly one shard) and
    the moves, one row per sample moved."""
    n, k = losses.shape
    lo, hi = size_bounds(n, k, cfg.max_imbalance)
    shard = shard.copy()
    sizes = np.bincount(shard, minlength=k)
    candidates = msr_candidates(skip_rate, cfg)
    moved = np.zeros(n, dtype=bool)
    moves = []
    for j, i in enumerate(candidates):
        src = shard[i]
        members = np.array([i]) if groups is None else np.flatnonzero((groups == groups[i]) & (shard == src))
        if moved[i] or sizes[src] - len(members) < lo:
            continue
        if np.isnan(losses[i]).any():
            if score is None:
                raise ValueError(f"no losses for candidate position {i} and no score function")
            batch = _next_reads(candidates[j:], shard, sizes, lo, losses, score_at_least)
            losses[batch] = score(batch)
        for dst in np.lexsort((np.arange(k), -losses[i])):  # highest loss first, ties by index
            if dst == src:
                break
            if sizes[dst] + len(members) <= hi:
                shard[members], moved[members] = dst, True
                sizes[src] -= len(members)
                sizes[dst] += len(members)
                moves.extend({"position": int(m), "from": int(src), "to": int(dst), "skip_rate": float(skip_rate[i]),
                              "loss_from": float(losses[i, src]), "loss_to": float(losses[i, dst])} for m in members)
                break
    return shard, moves


class MSR(Mitigation):
    """Reads the round's skip rates (AGC) and the loss table; moves candidates between shards."""

    def end_round(self, end: RoundEnd) -> None:
        end.shard, moves = redistribute(end.shard, end.skip_rate, end.losses, self.cfg,
                                        score=end.score, score_at_least=PROFILE_AT_LEAST, groups=end.groups)
        end.moves.extend(moves)
