"""The IET round loop. The fair baseline is the same loop with one shard, no mitigation, and K
times the local steps, so both models get the same optimizer steps x batch size.

A round, as `run` reads: every proxy trains on its shard (`train_proxies`); the proxies are
averaged, weighted by shard size (`average_proxies`); with K > 1 the samples are scored under the
proxies' end-of-round weights (the loss table) and the mitigations act on it, MSR moving samples
between shards (`end_round`); the average is loaded back into every proxy and the whole state is
saved (`save_state`), so a killed run resumes from its last complete round. `finish` writes the
models. What one round hands the next is a `Progress`; what stays fixed is a `Run`."""
from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from pipeline import checkpoint, ensemble, mitigation, seeds, stacked
from pipeline.loss_table import LossTable
from pipeline.config import Params, resolve_device
from pipeline.data import ImageSet
from pipeline.distributed import Ranks
from pipeline.io import atomic_path, write_csv, write_json
from pipeline.models import build_scheduler, save_pipeline
from pipeline.mitigation import Mitigations, RoundEnd
from pipeline.pretrained import initial_unet
from pipeline.seeds import derived_seed
from pipeline.training import OneProxy, Proxy, RoundCounts, new_proxy, train_steps, warmup_steps


@dataclass(frozen=True)
class Plan:
    """What one run of the loop does; derived from params so baseline and IET share the budget."""
    shards: int
    rounds: int
    steps_per_round: int   # optimizer steps of each proxy per round
    mitigations: tuple[str, ...] = ()  # registry names (pipeline.mitigation), in hook order
    checkpoints_per_round: int = 1  # weights saved this many times a round (evenly), the last at its end:
    # the same share of every model's optimizer steps, so every model's curve is read alike
    # what variant names show of the mitigations' settings (mitigation.shown); params hold it too, so
    # it stays out of the repr that resume fingerprints read
    shown: tuple[tuple[str, object], ...] = field(default=(), repr=False)

    @classmethod
    def iet(cls, p: Params) -> "Plan":
        """With iet.shards = 1 the same steps as the baseline (dp.enabled trains DP-SGD that way)."""
        return cls(shards=p.iet.shards, rounds=p.iet.rounds, steps_per_round=iet_steps_per_round(p),
                   mitigations=mitigation.active(mitigation.enabled_in(p), p.iet.shards),
                   checkpoints_per_round=p.iet.checkpoints_per_round,
                   shown=tuple(mitigation.shown(p).items()))

    @classmethod
    def baseline(cls, p: Params) -> "Plan":
        return cls(shards=1, rounds=p.iet.rounds, steps_per_round=p.iet.shards * iet_steps_per_round(p),
                   checkpoints_per_round=p.iet.checkpoints_per_round)

    @property
    def variant(self) -> str:
        return mitigation.variant_name(self.shards, self.mitigations, dict(self.shown))


def iet_steps_per_round(p: Params) -> int:
    """A proxy's optimizer steps a round (Params.iet_steps_per_round, which validation bounds by)."""
    return p.iet_steps_per_round()


class Hooks:
    """Where the loop reports to (MLflow in the stages); the defaults do nothing."""
    def proxy_round(self, rnd: int, proxy: int, curve: list[dict]) -> None: ...
    def round_done(self, rnd: int, metrics: dict, round_dir: Path) -> None: ...


def _cell(x: float) -> float | str:
    return "" if np.isnan(x) else float(x)


@dataclass
class Run:
    """What stays fixed over the rounds of one run."""
    params: Params
    plan: Plan
    train: ImageSet
    images: torch.Tensor
    noise_schedule: object
    proxies: dict[int, Proxy]   # the proxies this process trains
    mitigations: Mitigations
    out_dir: Path
    state_dir: Path
    fingerprint: str
    like_model: dict             # shapes and dtypes of what is shared between processes
    like_ema: dict
    hooks: Hooks
    ranks: Ranks
    groups: np.ndarray | None    # near-duplicate group per position with iet.split: groups (MSR moves them whole)
    duplicated: np.ndarray       # whether each position's image occurs more than once (exact copies)
    midpoints: dict = field(default_factory=dict)  # {checkpoint j: {proxy: weights}} of the round under way


@dataclass
class Progress:
    """What one round hands the next; the resume state holds it."""
    shard: np.ndarray            # shard of every training-set position
    next_round: int = 0
    seconds: float = 0.0
    history: list[dict] = field(default_factory=list)  # curve points of every proxy and round


def run(params: Params, plan: Plan, train: ImageSet, shard: np.ndarray, out_dir: str | Path,
        state_dir: str | Path, hooks: Hooks | None = None, ranks: Ranks | None = None) -> dict:
    """Train per `plan`; write rounds/, model/ (raw averaged weights), model_ema/, curves.csv and
    return a summary. `shard` gives the initial shard of every training-set position. Under
    several processes (`ranks`) proxy k trains on rank k % world and only rank 0 writes outputs
    and calls the hooks; the weights do not depend on the process count."""
    r = _start(params, plan, train, shard, Path(out_dir), Path(state_dir), hooks or Hooks(),
               ranks or Ranks(device=resolve_device(params.train.device)))
    progress = _resume(r, shard)
    for rnd in range(progress.next_round, plan.rounds):
        t0 = time.perf_counter()
        counts = train_proxies(r, progress, rnd)
        train_seconds = time.perf_counter() - t0
        averaged, ema_averaged = average_proxies(r, progress, rnd)
        metrics = end_round(r, progress, rnd, counts)
        for proxy in r.proxies.values():
            proxy.model.load_state_dict(averaged)
            for i, shadow in enumerate(proxy.ema.shadow_params):
                shadow.data.copy_(ema_averaged[i])
        progress.seconds += time.perf_counter() - t0
        metrics.update(round_seconds=time.perf_counter() - t0, round_train_seconds=train_seconds)
        if r.ranks.is_main:
            round_dir = _round_dir(r, rnd)
            write_json(round_dir / "round.json", metrics)
            r.hooks.round_done(rnd, metrics, round_dir)
        progress.next_round = rnd + 1
        save_state(r, progress)
    return finish(r, progress)


def _start(params: Params, plan: Plan, train: ImageSet, shard: np.ndarray, out_dir: Path, state_dir: Path,
           hooks: Hooks, ranks: Ranks) -> Run:
    torch.set_num_threads(params.train.threads)
    seed = params.seeds.train
    init = initial_unet(params, seed)
    owned = ranks.owned(plan.shards)
    steps = plan.rounds * plan.steps_per_round  # of each proxy
    proxies = {k: new_proxy(init, params, derived_seed(seed, seeds.PROXY, k), ranks.device, steps) for k in owned}
    mitigations = Mitigations(plan.mitigations, params, len(train), tuple(owned), ranks.device,
                              warmup_steps(params, steps), train.images)
    for k, proxy in proxies.items():
        mitigations.attach(k, proxy)
    # the training set lives on the device: a step gathers its batch there, nothing crosses the bus
    run_fingerprint = checkpoint.fingerprint(params, plan, train.images, shard, init, ranks.device)
    return Run(params, plan, train, train.to_tensor().to(ranks.device), build_scheduler(params.model), proxies,
               mitigations, out_dir, state_dir, run_fingerprint, init.state_dict(),
               dict(enumerate(p.detach() for p in init.parameters())), hooks, ranks, _groups(params, plan, train), _duplicated(train))


def _duplicated(train: ImageSet) -> np.ndarray:
    from pipeline.dedup import duplicate_groups

    groups = duplicate_groups(train.images)
    return groups.sizes[groups.group] > 1


def _groups(params: Params, plan: Plan, train: ImageSet) -> np.ndarray | None:
    """With iet.split: groups, the near-duplicate group of each position, which MSR moves whole."""
    if params.iet.split != "groups" or plan.shards < 2:
        return None
    from pipeline.dedup import near_duplicate_groups

    return near_duplicate_groups(train.images, params.iet.near_duplicate).group


def _resume(r: Run, shard: np.ndarray) -> Progress:
    """The saved progress when a state of this very run exists, else a fresh start (and no rounds
    of an earlier run left behind)."""
    folder, info = checkpoint.find(r.state_dir, r.fingerprint, r.ranks)
    if folder is None:
        if r.ranks.is_main:
            shutil.rmtree(r.out_dir / "rounds", ignore_errors=True)
        r.ranks.barrier()
        return Progress(shard)
    shard = checkpoint.restore(folder, r.proxies, r.mitigations)
    done = info["round"] + 1
    if r.ranks.is_main:
        print(f"resuming {r.out_dir} after round {done} of {r.plan.rounds}")
    r.ranks.barrier()
    return Progress(shard, done, info["seconds"], info["history"])


def train_proxies(r: Run, progress: Progress, rnd: int) -> RoundCounts:
    """Every proxy of this process trains on its shard as it is, its share of the round's steps
    (`proxy_steps`), one after another or stacked (train.stack_proxies); then the draw/skip
    counts, the mitigations' state and the curves are combined over processes."""
    counts = RoundCounts.zeros(len(r.train), r.ranks.device)
    curves: dict[int, list[dict]] = {k: [] for k in r.proxies}
    members = {k: r.mitigations.members(k, torch.from_numpy(np.flatnonzero(progress.shard == k)).to(r.ranks.device))
               for k in range(r.plan.shards)}
    steps = proxy_steps(r.plan.shards * r.plan.steps_per_round, [len(members[k]) for k in range(r.plan.shards)])
    for group in _training_groups(r, steps, members):
        names, first = ", ".join(str(k + 1) for k in group.proxies), next(iter(group.proxies))
        train_steps(group, r.images, members, steps[first], r.noise_schedule, r.params, r.mitigations,
                    counts, desc=f"round {rnd + 1}/{r.plan.rounds} prox{'ies' if len(group.proxies) > 1 else 'y'} "
                    f"{names}/{r.plan.shards}", on_curve=lambda k, row: curves[k].append({"round": rnd, "proxy": k, **row}),
                    on_step=_checkpointer(r, steps[first], group))
        group.finish()
        for k in group.proxies:
            if r.ranks.is_main:
                r.hooks.proxy_round(rnd, k, curves[k])
    # A sample is drawn only by its shard's proxy, so every count and strength has one source rank.
    r.ranks.sum_(counts.drawn)
    r.ranks.sum_(counts.skipped)
    r.mitigations.sync(r.ranks, torch.from_numpy(np.isin(progress.shard, list(r.proxies))).to(r.ranks.device))
    curves = {k: c for part in r.ranks.gather(curves) for k, c in part.items()}
    for k in range(r.plan.shards):
        progress.history.extend(curves[k])
        if r.ranks.is_main and k not in r.proxies:
            r.hooks.proxy_round(rnd, k, curves[k])
    return counts


def proxy_steps(total: int, sizes: list[int]) -> list[int]:
    """The round's optimizer steps split over the proxies in proportion to the samples each draws
    from (largest remainder, so that they add up to `total`, the baseline's steps of a round): every
    proxy trains the same number of epochs (iet.local_epochs) of its shard as MSR left it, where a
    fixed count would give a shrunk shard more epochs and a grown one fewer."""
    share = total * np.asarray(sizes, np.float64) / max(sum(sizes), 1)
    steps = np.floor(share).astype(np.int64)
    steps[np.argsort(steps - share, kind="stable")[: total - int(steps.sum())]] += 1
    return steps.tolist()


def _training_groups(r: Run, steps: list[int], members: dict[int, torch.Tensor]) -> list:
    """This process's proxies as train_steps groups: all of them stacked when train.stack_proxies
    wants it and they take the same steps with the same batch size, and took the same steps before
    (one vmapped step for all), else one by one. Once MSR has made the shards unequal, the proxies'
    steps differ (proxy_steps) and the rest of the run trains them one by one."""
    # one step count for the stack's Adam and LR schedule: the proxies must have taken the same steps so far too
    alike = len({(steps[k], min(r.params.train.batch_size, len(members[k])), proxy.step)
                 for k, proxy in r.proxies.items()}) == 1
    if alike and stacked.wanted(r.params, r.ranks.device, len(r.proxies)):
        return [stacked.Stacked(r.proxies, r.params)]
    return [OneProxy(k, proxy, r.params) for k, proxy in r.proxies.items()]


def _checkpointer(r: Run, steps: int, group):
    """With checkpoints_per_round C > 1, a callback that keeps every proxy's weights after each
    1/C of its `steps` this round but the last (its end is the round's aggregate), for
    `average_proxies` to average into rounds/round_NN/checkpoint_JJ.safetensors. For evaluation
    only: training never reads them, so the final weights are the same with or without
    (tests/test_comparison.py)."""
    if r.plan.checkpoints_per_round == 1:
        return None
    marks = {j: round(j * steps / r.plan.checkpoints_per_round) for j in range(1, r.plan.checkpoints_per_round)}

    def keep(done: int) -> None:
        for j, at in marks.items():
            if at == done:
                r.midpoints.setdefault(j, {}).update(group.current_weights())
    keep(0)  # a proxy with fewer steps than checkpoints: its weights as the round starts
    return keep


def average_proxies(r: Run, progress: Progress, rnd: int) -> tuple[dict, dict]:
    """The shard-size-weighted mean of the proxies' end-of-round weights and of their EMA weights
    (IET's aggregation), every proxy's state sent from its owner; saved beside the round."""
    sizes = np.bincount(progress.shard, minlength=r.plan.shards).tolist()
    ends = [r.ranks.share_tensors(r.proxies[k].model.state_dict() if k in r.proxies else None, r.like_model,
                                  r.ranks.owner(k)) for k in range(r.plan.shards)]
    emas = [r.ranks.share_tensors(dict(enumerate(r.proxies[k].ema.shadow_params)) if k in r.proxies else None,
                                  r.like_ema, r.ranks.owner(k)) for k in range(r.plan.shards)]
    averaged = ensemble.aggregate(ends, sizes)
    midpoints = {j: ensemble.aggregate(_shared(r, states), sizes) for j, states in sorted(r.midpoints.items())}
    r.midpoints.clear()
    if r.ranks.is_main:
        round_dir = _round_dir(r, rnd)
        round_dir.mkdir(parents=True, exist_ok=True)
        files = {**{f"proxy_{k}": state for k, state in enumerate(ends)},
                 **{f"checkpoint_{j:02d}": state for j, state in midpoints.items()}, "aggregated": averaged}
        for name, state in files.items():  # aggregated last: checkpoints() reads a round by it
            with atomic_path(round_dir / f"{name}.safetensors") as tmp:
                save_file(state, str(tmp))
    return averaged, ensemble.aggregate(emas, sizes)


def _shared(r: Run, states: dict[int, dict]) -> list[dict]:
    """Every proxy's state of one mid-round checkpoint, sent from its owner."""
    return [r.ranks.share_tensors(states.get(k), r.like_model, r.ranks.owner(k)) for k in range(r.plan.shards)]


def end_round(r: Run, progress: Progress, rnd: int, counts: RoundCounts) -> dict:
    """With K > 1, score the samples under the proxies' end-of-round weights (the loss table) and
    let the mitigations act on it (MSR moves samples); write the round's tables. Returns the
    round's metrics."""
    drawn, skipped = counts.drawn.cpu().numpy(), counts.skipped.cpu().numpy()
    skip_rate = np.where(drawn > 0, skipped / np.maximum(drawn, 1), 0.0)
    metrics = {"moved": 0}
    if r.plan.shards > 1:
        t0 = time.perf_counter()
        profile = LossTable(r.proxies, r.images, r.noise_schedule, r.ranks, r.plan.shards, r.params.msr.profile_timesteps,
                            derived_seed(r.params.seeds.train, seeds.PROFILE, rnd))
        profile.score(np.ones((len(r.train), r.plan.shards), dtype=bool) if r.params.msr.profile == "all"
                      else progress.shard[:, None] == np.arange(r.plan.shards))
        end = RoundEnd(progress.shard, skip_rate, profile.losses, profile.rows, r.groups)
        r.mitigations.end_round(end)
        metrics["profile_seconds"] = time.perf_counter() - t0
        if r.ranks.is_main:
            _write_loss_table(r, rnd, progress.shard, drawn, skipped, skip_rate, profile.losses, end.moves)
        progress.shard, metrics["moved"] = end.shard, len(end.moves)
    if r.ranks.is_main:
        write_csv(_round_dir(r, rnd) / "shards.csv",
                   [{"sample_id": int(i), "shard": int(s)} for i, s in zip(r.train.ids, progress.shard)],
                   ["sample_id", "shard"])
    return {**metrics, "skip_fraction": float(skipped.sum() / max(drawn.sum(), 1)),
            "skip_rate_mean": float(skip_rate.mean()), **_selectivity(skip_rate, drawn, r.duplicated),
            **r.mitigations.round_metrics()}


def _selectivity(skip_rate: np.ndarray, drawn: np.ndarray, duplicated: np.ndarray) -> dict[str, float]:
    """The round's mean skip rate of duplicated samples and of unique ones (drawn at least once):
    whether AGC singles out the images stored several times, visible in MLflow for every run."""
    out = {}
    for name, where in (("skip_rate_duplicated", duplicated), ("skip_rate_unique", ~duplicated)):
        seen = where & (drawn > 0)
        if seen.any():
            out[name] = float(skip_rate[seen].mean())
    return out


def _write_loss_table(r: Run, rnd: int, shard, drawn, skipped, skip_rate, losses, moves) -> None:
    ids = r.train.ids
    table = [{"sample_id": int(ids[i]), "shard": int(shard[i]), "drawn": int(drawn[i]),
              "skipped": int(skipped[i]), "skip_rate": float(skip_rate[i]), "loss_own": _cell(losses[i, shard[i]]),
              **{f"loss_proxy_{k}": _cell(losses[i, k]) for k in range(r.plan.shards)}}
             for i in range(len(ids))]
    write_csv(_round_dir(r, rnd) / "loss_table.csv", table, list(table[0]))
    write_csv(_round_dir(r, rnd) / "moves.csv", [{"sample_id": int(ids[m["position"]]),
                                                   **{k: v for k, v in m.items() if k != "position"}} for m in moves],
               ["sample_id", "from", "to", "skip_rate", "loss_from", "loss_to"])


def save_state(r: Run, progress: Progress) -> None:
    """The whole state after a complete round (pipeline/checkpoint.py): every proxy (weights, EMA,
    optimizer, schedule, generator, its mitigations' state), the shards and the per-sample state."""
    checkpoint.save(r.state_dir, r.proxies, r.mitigations,
                     {"fingerprint": r.fingerprint, "round": progress.next_round - 1, "seconds": progress.seconds,
                      "history": progress.history}, progress.shard, r.ranks)


def finish(r: Run, progress: Progress) -> dict:
    """Write curves.csv, the final models (raw averaged weights and EMA) and train_info.json; remove
    the resume state. Returns the summary."""
    plan = r.plan
    steps = plan.shards * plan.rounds * plan.steps_per_round
    summary = {"train_seconds": round(progress.seconds, 2), "optimizer_steps": steps,
               "images_seen": steps * r.params.train.batch_size, "shards": plan.shards, "rounds": plan.rounds,
               "variant": plan.variant, **{name: name in plan.mitigations for name in mitigation.REGISTRY},
               "processes": r.ranks.world, **r.mitigations.summary()}
    if not r.ranks.is_main:
        r.ranks.barrier()
        return summary
    fields = ["round", "proxy", "step", "loss", "kept"] + sorted({k for row in progress.history for k in row}
                                                                  - {"round", "proxy", "step", "loss", "kept"})
    write_csv(r.out_dir / "curves.csv", progress.history, fields)
    final = r.proxies[0]  # every proxy holds the average; proxy 0 lives on rank 0
    save_pipeline(final.model, r.noise_schedule, r.out_dir / "model")
    final.ema.copy_to(final.model.parameters())
    save_pipeline(final.model, r.noise_schedule, r.out_dir / "model_ema")
    write_json(r.out_dir / "train_info.json", summary)
    shutil.rmtree(r.state_dir, ignore_errors=True)
    r.ranks.barrier()
    return summary


def _round_dir(r: Run, rnd: int) -> Path:
    return r.out_dir / "rounds" / f"round_{rnd:02d}"
