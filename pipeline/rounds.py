"""The IET round loop. The fair baseline is the same loop with one shard, AGC/MSR/TAA off, and
K times the local steps, so both models get the same optimizer steps x batch size.

Per round: every proxy trains on its shard; the proxies are averaged (weighted by shard size)
and the average is loaded back into each; with K > 1 the samples are scored under the proxies'
end-of-round weights (the loss table) and, with MSR on, memorization-prone samples move shard.
After each round the whole state is saved, so a killed run resumes from its last complete round."""
from __future__ import annotations

import csv
import hashlib
import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from pipeline import ensemble
from pipeline.config import Params
from pipeline.data import ImageSet
from pipeline.distributed import Ranks
from pipeline.io import atomic_path, write_json
from pipeline.models import build_scheduler, initial_unet, save_pipeline
from pipeline.training import Proxy, RoundCounts, load_proxy, new_proxy, save_proxy, train_steps


@dataclass(frozen=True)
class Plan:
    """What one run of the loop does; derived from params so baseline and IET share the budget."""
    shards: int
    rounds: int
    steps_per_round: int   # optimizer steps of each proxy per round
    agc: bool
    msr: bool
    taa: bool

    @classmethod
    def iet(cls, p: Params) -> "Plan":
        return cls(p.iet.shards, p.iet.rounds, iet_steps_per_round(p), p.agc.enabled,
                   p.msr.enabled and p.agc.enabled and p.iet.shards > 1, p.taa.enabled and p.agc.enabled)

    @classmethod
    def baseline(cls, p: Params) -> "Plan":
        return cls(1, p.iet.rounds, p.iet.shards * iet_steps_per_round(p), False, False, False)


def iet_steps_per_round(p: Params) -> int:
    """local_epochs over a nominal shard of N/K images, in full batches."""
    shard = math.ceil(p.data.train_size / p.iet.shards)
    return max(1, math.ceil(p.iet.local_epochs * shard / p.train.batch_size))


class Hooks:
    """Where the loop reports to (MLflow in the stages); the defaults do nothing."""
    def proxy_round(self, rnd: int, proxy: int, curve: list[dict]) -> None: ...
    def round_done(self, rnd: int, metrics: dict, round_dir: Path) -> None: ...


def _fingerprint(p: Params, plan: Plan, train: ImageSet, shard: np.ndarray, init) -> str:
    """What a saved state must match to be resumed: params, data, shards and the initial weights
    (model.init_from names them, but the files behind the name can change)."""
    h = hashlib.sha256()
    # not train.launcher: the weights do not depend on the process count, so a run may resume under another
    h.update(json.dumps(p.model_dump(exclude={"eval": True, "tracking": True, "train": {"launcher"}}),
                        sort_keys=True).encode())
    h.update(repr(plan).encode())
    h.update(train.images.tobytes())
    h.update(shard.tobytes())
    for key, tensor in init.state_dict().items():
        h.update(key.encode())
        h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _write_csv(path: Path, rows: list[dict], fields: list[str]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)


def _save_state(state_dir: Path, proxies: dict[int, Proxy], info: dict, shard, strength, ranks: Ranks) -> None:
    """Write to a fresh directory, then swap it in: a kill at any moment leaves one complete state.
    Each rank writes its own proxies (several machines need the run directory on shared storage)."""
    tmp = state_dir.with_name(state_dir.name + ".tmp")
    if ranks.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    ranks.barrier()
    for k, proxy in proxies.items():
        save_proxy(proxy, tmp / f"proxy_{k}.safetensors")
    ranks.barrier()
    if ranks.is_main:
        save_file({"shard": torch.from_numpy(shard), "strength": strength}, str(tmp / "samples.safetensors"))
        write_json(tmp / "state.json", info)
        old = state_dir.with_name(state_dir.name + ".old")
        if state_dir.exists():
            shutil.rmtree(old, ignore_errors=True)
            state_dir.rename(old)
        tmp.rename(state_dir)
        shutil.rmtree(old, ignore_errors=True)
    ranks.barrier()


def _load_state(state_dir: Path, fingerprint: str):
    for d in (state_dir, state_dir.with_name(state_dir.name + ".old")):
        f = d / "state.json"
        if f.is_file():
            info = json.loads(f.read_text())
            if info.get("fingerprint") == fingerprint:
                return d, info
    return None, None


# Candidates scored per on-demand call, at least: a UNet forward has a fixed cost of about 15 ms on a
# CPU, the compute of ~5 images, so one call per proxy beats several small ones.
PROFILE_AT_LEAST = 32


class _Profile:
    """The round's loss table, losses[i, k] = loss of sample i under proxy k's end-of-round weights
    (NaN where not scored), filled as needed. Every sample is scored under its own proxy; under the
    other proxies only the rows redistribution reads (msr.profile: candidates), or every sample
    (msr.profile: all, K times the cost). A forward without gradients costs about a third of a
    training step, so a pair costs about (1 + rows read x (K-1) / N) / 3 local epochs.
    Each rank scores under its own proxies; the columns are then shared, so every rank holds the
    same table and makes the same (collective) calls."""

    def __init__(self, proxies: dict[int, Proxy], images: torch.Tensor, noise_schedule, params: Params,
                 plan: Plan, seed: int, ranks: Ranks):
        self.proxies, self.images, self.noise_schedule, self.ranks = proxies, images, noise_schedule, ranks
        self.pairs, self.seed = params.msr.profile_timesteps, seed
        self.losses = np.full((len(images), plan.shards), np.nan)

    def score(self, wanted: np.ndarray) -> None:
        """Score the NaN cells of losses where `wanted` (n x K) is true."""
        todo = wanted & np.isnan(self.losses)
        for k, proxy in self.proxies.items():
            positions = np.flatnonzero(todo[:, k])
            if len(positions):
                self.losses[positions, k] = ensemble.profile_losses(
                    proxy.model, self.images, positions, self.noise_schedule, self.pairs, self.seed).numpy()
        for k in range(self.losses.shape[1]):
            self.losses[:, k] = self.ranks.share_column(self.losses[:, k], self.ranks.owner(k))

    def rows(self, positions: np.ndarray) -> np.ndarray:
        """redistribute's score function: the rows of `positions` under every proxy."""
        wanted = np.zeros(self.losses.shape, dtype=bool)
        wanted[positions] = True
        self.score(wanted)
        return self.losses[positions]


def _cell(x: float) -> float | str:
    return "" if np.isnan(x) else float(x)


def run(params: Params, plan: Plan, train: ImageSet, shard: np.ndarray, out_dir: str | Path,
        state_dir: str | Path, hooks: Hooks | None = None, ranks: Ranks | None = None) -> dict:
    """Train per `plan`; write rounds/, model/ (raw averaged weights), model_ema/, curves.csv and
    return a summary. `shard` gives the initial shard of every training-set position. Under
    several processes (`ranks`) proxy k trains on rank k % world and only rank 0 writes outputs
    and calls the hooks; the weights do not depend on the process count."""
    hooks = hooks or Hooks()
    ranks = ranks or Ranks()
    out_dir, state_dir = Path(out_dir), Path(state_dir)
    torch.set_num_threads(params.train.threads)
    images = train.to_tensor()
    n = len(train)
    seed = params.seeds.train
    noise_schedule = build_scheduler(params.model)
    init = initial_unet(params, seed)
    proxies = {k: new_proxy(init, params, seed * 1000 + k + 1, ranks.device) for k in ranks.owned(plan.shards)}
    like_model = init.state_dict()
    like_ema = dict(enumerate(p.detach() for p in init.parameters()))
    strength = torch.zeros(n)
    fingerprint = _fingerprint(params, plan, train, shard, init)

    start_round, elapsed, history = 0, 0.0, []
    resume_dir, info = _load_state(state_dir, fingerprint)
    if resume_dir is not None:
        for k, proxy in proxies.items():
            load_proxy(proxy, resume_dir / f"proxy_{k}.safetensors")
        saved = load_file(str(resume_dir / "samples.safetensors"))
        shard, strength = saved["shard"].numpy().copy(), saved["strength"]
        start_round, elapsed, history = info["round"] + 1, info["seconds"], info["history"]
        if ranks.is_main:
            print(f"resuming {out_dir} after round {info['round']} of {plan.rounds}")
    elif ranks.is_main:
        shutil.rmtree(out_dir / "rounds", ignore_errors=True)
    ranks.barrier()

    curve_path = out_dir / "curves.csv"
    for rnd in range(start_round, plan.rounds):
        t0 = time.perf_counter()
        counts = RoundCounts.zeros(n)
        curves: dict[int, list[dict]] = {}
        for k, proxy in proxies.items():
            curve = curves.setdefault(k, [])
            members = torch.from_numpy(np.flatnonzero(shard == k))
            train_steps(proxy, images, members, plan.steps_per_round, noise_schedule, params,
                        use_agc=plan.agc, strength=strength if plan.taa else None, counts=counts,
                        desc=f"round {rnd + 1}/{plan.rounds} proxy {k + 1}/{plan.shards}",
                        on_curve=lambda row, k=k: curves[k].append({"round": rnd, "proxy": k, **row}))
            if ranks.is_main:
                hooks.proxy_round(rnd, k, curve)
        # A sample is drawn only by its shard's proxy, so every count and strength has one source rank.
        ranks.sum_(counts.drawn)
        ranks.sum_(counts.skipped)
        if plan.taa and ranks.world > 1:
            ranks.sum_(strength.mul_(torch.from_numpy(np.isin(shard, list(proxies)))))
        curves = {k: c for part in ranks.gather(curves) for k, c in part.items()}
        for k in range(plan.shards):
            history.extend(curves[k])
            if ranks.is_main and k not in proxies:
                hooks.proxy_round(rnd, k, curves[k])

        train_seconds = time.perf_counter() - t0
        round_dir = out_dir / "rounds" / f"round_{rnd:02d}"
        sizes = np.bincount(shard, minlength=plan.shards)
        ends = [ranks.share_tensors(proxies[k].model.state_dict() if k in proxies else None, like_model,
                                    ranks.owner(k)) for k in range(plan.shards)]
        emas = [ranks.share_tensors(dict(enumerate(proxies[k].ema.shadow_params)) if k in proxies else None,
                                    like_ema, ranks.owner(k)) for k in range(plan.shards)]
        averaged = ensemble.aggregate(ends, sizes.tolist())
        ema_avg = ensemble.aggregate(emas, sizes.tolist())
        if ranks.is_main:
            round_dir.mkdir(parents=True, exist_ok=True)
            for k, state in enumerate(ends):
                with atomic_path(round_dir / f"proxy_{k}.safetensors") as tmp:
                    save_file(state, str(tmp))
            with atomic_path(round_dir / "aggregated.safetensors") as tmp:
                save_file(averaged, str(tmp))

        metrics = {"round_seconds": 0.0, "moved": 0}
        drawn, skipped = counts.drawn.numpy(), counts.skipped.numpy()
        skip_rate = np.where(drawn > 0, skipped / np.maximum(drawn, 1), 0.0)
        if plan.shards > 1:
            t_profile = time.perf_counter()
            profile = _Profile(proxies, images, noise_schedule, params, plan, seed * 7919 + rnd, ranks)
            profile.score(np.ones((n, plan.shards), dtype=bool) if params.msr.profile == "all"
                          else shard[:, None] == np.arange(plan.shards))
            new_shard, moves = shard, []
            if plan.msr:
                new_shard, moves = ensemble.redistribute(shard, skip_rate, profile.losses, params.msr,
                                                         score=profile.rows, score_at_least=PROFILE_AT_LEAST)
            metrics["profile_seconds"] = time.perf_counter() - t_profile
            losses = profile.losses
            table = [{"sample_id": int(train.ids[i]), "shard": int(shard[i]), "drawn": int(drawn[i]),
                      "skipped": int(skipped[i]), "skip_rate": float(skip_rate[i]),
                      "loss_own": _cell(losses[i, shard[i]]),
                      **{f"loss_proxy_{k}": _cell(losses[i, k]) for k in range(plan.shards)}}
                     for i in range(n)]
            for m in moves:
                m["sample_id"] = int(train.ids[m.pop("position")])
            if ranks.is_main:
                _write_csv(round_dir / "loss_table.csv", table, list(table[0]))
                _write_csv(round_dir / "moves.csv", moves,
                           ["sample_id", "from", "to", "skip_rate", "loss_from", "loss_to"])
            shard = new_shard
            metrics["moved"] = len(moves)
        if ranks.is_main:
            _write_csv(round_dir / "shards.csv",
                       [{"sample_id": int(i), "shard": int(s)} for i, s in zip(train.ids, shard)],
                       ["sample_id", "shard"])

        for p in proxies.values():
            p.model.load_state_dict(averaged)
            for i, shadow in enumerate(p.ema.shadow_params):
                shadow.data.copy_(ema_avg[i])

        bank_means = {k: v for part in ranks.gather({k: p.bank.mean().item() for k, p in proxies.items()})
                      for k, v in part.items()}
        elapsed += time.perf_counter() - t0
        metrics.update({"round_seconds": time.perf_counter() - t0, "round_train_seconds": train_seconds,
                        "skip_fraction": float(skipped.sum() / max(drawn.sum(), 1)),
                        "skip_rate_mean": float(skip_rate.mean()),
                        "taa_strength_mean": float(strength.mean()),
                        "bank_mean": float(np.mean([bank_means[k] for k in range(plan.shards)]))})
        if ranks.is_main:
            write_json(round_dir / "round.json", metrics)
            hooks.round_done(rnd, metrics, round_dir)
        _save_state(state_dir, proxies, {"fingerprint": fingerprint, "round": rnd, "seconds": elapsed,
                                         "history": history}, shard, strength, ranks)

    summary = {"train_seconds": round(elapsed, 2), "optimizer_steps": plan.shards * plan.rounds * plan.steps_per_round,
               "images_seen": plan.shards * plan.rounds * plan.steps_per_round * params.train.batch_size,
               "shards": plan.shards, "rounds": plan.rounds, "agc": plan.agc, "msr": plan.msr, "taa": plan.taa,
               "processes": ranks.world}
    if not ranks.is_main:
        ranks.barrier()
        return summary
    _write_csv(curve_path, history, ["round", "proxy", "step", "loss", "kept", "bank_mean"])
    final = proxies[0]  # every proxy holds the average; proxy 0 lives on rank 0
    save_pipeline(final.model, noise_schedule, out_dir / "model")
    final.ema.copy_to(final.model.parameters())
    save_pipeline(final.model, noise_schedule, out_dir / "model_ema")
    write_json(out_dir / "train_info.json", summary)
    shutil.rmtree(state_dir, ignore_errors=True)
    ranks.barrier()
    return summary
