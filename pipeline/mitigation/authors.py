"""MSR and TAA as the P2 authors prototyped them, beside this project's own design (msr.py, taa.py):
their unreleased code for Stable Diffusion fine-tuning (liuxiao-guan/DCR_X, commit e843724,
src_EX/*_diffc4_dy_interex.py and datasets_skiaug.py), rewritten here from its rules; whether it
matches the published paper is not known (docs/authors_variant.md says where the two designs differ).

RingMSR (`msr.mode: ring`): per sample a count of AGC skips since the last exchange. Rounds
alternate: after an even round (0, 2, ...) the proxies are averaged, plain mean, and loaded back;
after an odd one they are not, and each proxy k sends the top `msr.exchange` share of its shard by
skip count to proxy (k + 1) mod K; every count is then reset. The last round always averages here
(the prototype saves only averaged models).

QueueTAA (`taa.mode: queue`): a draw is a forward pass without gradient; AGC's mask and bank act on
it as always (the bank takes every draw). Each kept sample joins the proxy's queue with strength
exp(-5 d), d = |l / tau - bank[t]| / bank[t]: the nearer the threshold, the stronger. Once the
queue holds a batch, its first 8 take one optimizer step (plain mean loss) under RandAugment(2,
int(mean strength x taa.augment_base)), and the queue is emptied."""
from __future__ import annotations

import numpy as np
import torch

from pipeline.core.config import MSRConfig, TAAConfig
from pipeline.mitigation.base import Context, Mitigation, RoundEnd, Step
from pipeline.mitigation.randaugment import rand_augment

QUEUE_TAKE = 8          # the prototype trains on the first 8 of a full queue (its runs' batch size)
STRENGTH_SCALE = 5.0    # strength exp(-5 d)
EPS = 1e-8              # the prototype's guard in d's denominator


def exchange_candidates(members: np.ndarray, skips: np.ndarray, fraction: float) -> np.ndarray:
    """What one proxy sends, by the prototype's rule: top = int(fraction x shard size); every sample
    whose skip count is among the top largest counts qualifies, and the first `top` of them in shard
    order go (so at a tie the earlier sample goes, and with no skips at all the first `top` go).
    `members`: the shard's positions in shard order."""
    top = int(len(members) * fraction)
    if top == 0:
        return members[:0]
    values = skips[members]
    kth = np.sort(values)[::-1][top - 1]
    return members[values >= kth][:top]


def shard_order(shard: np.ndarray, arrival: np.ndarray, k: int) -> np.ndarray:
    """Shard k's positions in shard order: the prototype's list keeps its samples in arrival order
    (received ones appended at its end)."""
    members = np.flatnonzero(shard == k)
    return members[np.argsort(arrival[members], kind="stable")]


def ring_exchange(shard: np.ndarray, skips: np.ndarray, arrival: np.ndarray, shards: int,
                  fraction: float) -> tuple[np.ndarray, np.ndarray, list[tuple[int, int, int]]]:
    """Every proxy k sends its exchange_candidates to proxy (k + 1) mod K, chosen from its shard as
    it was before any sample moved (received samples are not sent on in the same exchange); the
    receiver appends them after its own, in the sender's order. Returns the new shards, the new
    arrival order and the moves (position, from, to): every sample stays in exactly one shard."""
    sent = [exchange_candidates(shard_order(shard, arrival, k), skips, fraction) for k in range(shards)]
    shard, arrival = shard.copy(), arrival.copy()
    nxt = int(arrival.max()) + 1 if len(arrival) else 0
    moves = []
    for k, go in enumerate(sent):
        dst = (k + 1) % shards
        shard[go] = dst
        arrival[go] = nxt + np.arange(len(go))
        nxt += len(go)
        moves.extend((int(i), k, dst) for i in go)
    return shard, arrival, moves


def averaging_round(rnd: int, rounds: int) -> bool:
    """The prototype averages after even rounds only; the last round averages too."""
    return rnd % 2 == 0 or rnd == rounds - 1


class RingMSR(Mitigation):
    """Skip counts per sample since the last exchange (and each sample's place in its shard's order)."""

    def __init__(self, cfg: MSRConfig, ctx: Context):
        super().__init__(cfg, ctx)
        self.skips = torch.zeros(ctx.samples, dtype=torch.long, device=ctx.device)
        # shard order: at the start, by position (the prototype's shards list their samples in index order)
        self.arrival = torch.arange(ctx.samples, dtype=torch.long)
        self.exchanged = 0

    def observe(self, k: int, step: Step) -> None:
        self.skips.index_add_(0, step.positions, (~step.keep).long())

    def sync(self, ranks, owned):
        if ranks.world > 1:  # a sample is drawn only by its shard's proxy: one source rank each
            ranks.sum_(self.skips.mul_(owned.long()))

    def end_round(self, end: RoundEnd) -> None:
        self.exchanged = 0
        if end.round % 2 == 0:
            return
        shards = end.losses.shape[1]
        shard, arrival, moves = ring_exchange(end.shard, self.skips.cpu().numpy(), self.arrival.numpy(), shards,
                                              self.cfg.exchange)
        end.moves.extend({"position": i, "from": src, "to": dst, "skip_rate": float(end.skip_rate[i]),
                          "loss_from": float(end.losses[i, src]), "loss_to": float(end.losses[i, dst])}
                         for i, src, dst in moves)
        end.shard, self.arrival, self.exchanged = shard, torch.from_numpy(arrival), len(moves)
        self.skips.zero_()

    def weights(self, sizes):
        return [1.0] * len(sizes)  # the prototype's plain mean

    def averages(self, rnd, rounds):
        return averaging_round(rnd, rounds)

    def state(self, k):
        return {"skips": self.skips, "arrival": self.arrival} if k is None else {}

    def load_state(self, tensors, k):
        if k is None:
            self.skips = tensors["skips"].to(self.ctx.device)
            self.arrival = tensors["arrival"].cpu()

    def round_metrics(self):
        return {"msr_ring_exchanged": float(self.exchanged)}


def queue_strength(losses: torch.Tensor, bank_t: torch.Tensor, tau: float) -> torch.Tensor:
    """exp(-5 d), d = |l x mem_ratio - bank[t]| / (|bank[t]| + 1e-8), mem_ratio = 1 / tau (the
    prototype's 1.25 is tau 0.8): 1 at the threshold, falling off on either side."""
    distance = (losses * (1.0 / tau) - bank_t).abs() / (bank_t.abs() + EPS)
    return torch.exp(-STRENGTH_SCALE * distance)


def queue_magnitude(strengths: torch.Tensor, base: float) -> int:
    """The RandAugment magnitude of a queue batch: int(mean strength x base), as the prototype's dataset."""
    return int(strengths.mean().item() * base)


class QueueTAA(Mitigation):
    """Per proxy a queue of kept samples and their strengths; the proxy trains only on it."""
    trains_draws = False

    def __init__(self, cfg: TAAConfig, ctx: Context):
        super().__init__(cfg, ctx)
        self.agc = ctx.others["agc"]
        self.pixels = torch.from_numpy(ctx.images).to(ctx.device)  # uint8: RandAugment works on pixels
        self.queue = {k: torch.zeros(0, dtype=torch.long, device=ctx.device) for k in ctx.proxies}
        self.strength = {k: torch.zeros(0, device=ctx.device) for k in ctx.proxies}
        self.steps = dict.fromkeys(ctx.proxies, 0)              # queue steps of the whole run
        self.round = {k: [0, 0.0] for k in ctx.proxies}         # this round's queue steps, summed mean strengths
        self.totals: dict[int, tuple[int, int, float]] = {}     # every proxy's, after sync

    def observe(self, k: int, step: Step) -> None:
        # AGC observes first (registry order); its reference is the bank the mask compared against
        strength = queue_strength(step.losses, self.agc.reference, self.agc.cfg.tau)
        self.queue[k] = torch.cat([self.queue[k], step.positions[step.keep]])
        self.strength[k] = torch.cat([self.strength[k], strength[step.keep]])

    def queued(self, k, generator):
        if len(self.queue[k]) < self.ctx.batch_size:
            return None
        take, strength = self.queue[k][:QUEUE_TAKE], self.strength[k][:QUEUE_TAKE]
        self.queue[k], self.strength[k] = self.queue[k][:0], self.strength[k][:0]
        magnitude = queue_magnitude(strength, self.cfg.augment_base)
        self.steps[k] += 1
        self.round[k][0] += 1
        self.round[k][1] += float(strength.mean())
        images = rand_augment(self.pixels[take], magnitude, generator)
        return take, images.float().div_(127.5).sub_(1.0)  # as ImageSet.to_tensor

    def sync(self, ranks, owned):
        mine = {k: (self.steps[k], *self.round[k]) for k in self.steps}
        self.totals = {k: v for part in ranks.gather(mine) for k, v in part.items()}
        self.round = {k: [0, 0.0] for k in self.steps}

    def state(self, k):
        if k is None:
            return {}
        return {"queue": self.queue[k], "queue_strength": self.strength[k], "queue_steps": torch.tensor(self.steps[k])}

    def load_state(self, tensors, k):
        if k is not None:
            self.queue[k] = tensors["queue"].to(self.ctx.device)
            self.strength[k] = tensors["queue_strength"].to(self.ctx.device)
            self.steps[k] = int(tensors["queue_steps"])

    def round_metrics(self):
        if not self.totals:  # a profile stage's process: the train stage recorded it
            return {}
        steps = sum(v[1] for v in self.totals.values())
        return {"taa_queue_steps": float(steps),
                "taa_queue_strength": sum(v[2] for v in self.totals.values()) / steps if steps else 0.0}

    def summary(self):
        # every optimizer step is a queue step: the run's count of draws is not its count of steps
        # the finish stage's process holds every proxy, restored, and has not synced
        steps = sum(v[0] for v in self.totals.values()) if self.totals else sum(self.steps.values())
        return {"taa_queue_steps_total": steps, "optimizer_steps": steps}
