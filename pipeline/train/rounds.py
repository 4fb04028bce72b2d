"""The IET round loop. The fair baseline is the same loop with one shard, no mitigation, and K
times the local steps, so both models get the same optimizer steps x batch size.

A round is three stages, each a DVC stage of its own (dvc.yaml) and a function here, which hand
each other the round's folders (pipeline/core/layout.py, pipeline/core/checkpoint.py):
  train      every proxy trains on its shard (`train_round`);
  aggregate  the proxies are averaged, weighted by shard size (pipeline.train.ensemble.average_round);
  profile    with K > 1 the samples are scored under the proxies' end-of-round weights (the loss
             table) and the mitigations act on it, MSR moving samples between shards (`profile_round`).
The next round starts from the proxies as trained, the profile's shards and mitigation state, and
the average loaded into every proxy (the authors' ring MSR: after even rounds and the last only).
`finish` writes the models. A stage rebuilds the run (`start`) and loads the state it starts from
(`restore_trained`, `restore_round_end`); `run` does all rounds in one process through the same
folders. What one round hands the next is a `Progress`; what stays fixed is a `Run`."""
from __future__ import annotations

import copy
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from pipeline.core import checkpoint, seeds

from pipeline.train import ensemble, stacked

from pipeline import mitigation
from pipeline.train.loss_table import LossTable
from pipeline.core.config import Params, resolve_device
from pipeline.core.data import ImageSet
from pipeline.core.distributed import Ranks
from pipeline.core.io import read_json, staged_folder, write_csv, write_json
from pipeline.core.layout import ROUND_INFO, TRAIN_INFO, Rounds
from pipeline.core.models import build_scheduler, save_pipeline
from pipeline.mitigation import Mitigations, RoundEnd
from pipeline.core.pretrained import initial_unet
from pipeline.core.seeds import derived_seed
from pipeline.train.training import OneProxy, Proxy, RoundCounts, new_proxy, train_steps, warmup_steps


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
    """Where the loop reports to (MLflow in the stages); the defaults do nothing. `round_done` gets
    the round's averaged model as a saved pipeline where `logs_models` asks for it."""
    logs_models = False

    def proxy_round(self, rnd: int, proxy: int, curve: list[dict]) -> None: ...
    def round_done(self, rnd: int, metrics: dict, folder: Path, averaged: Path | None = None) -> None: ...


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
    proxies: dict[int, Proxy | None]  # the proxies this process trains (None: start(models=False))
    mitigations: Mitigations
    rounds: Rounds               # where the rounds' folders are (pipeline/core/layout.py)
    fingerprint: str
    hooks: Hooks
    ranks: Ranks
    groups: np.ndarray | None    # near-duplicate group per position with iet.split: groups (MSR moves them whole)
    duplicated: np.ndarray       # whether each position's image occurs more than once (exact copies)
    midpoints: dict = field(default_factory=dict)  # {checkpoint j: {proxy: weights}} of the round under way


@dataclass
class Progress:
    """What one round hands the next (through the round's folders)."""
    shard: np.ndarray            # shard of every training-set position
    next_round: int = 0
    seconds: float = 0.0
    history: list[dict] = field(default_factory=list)  # curve points of every proxy and round


def run(params: Params, plan: Plan, train: ImageSet, shard: np.ndarray, out_dir: str | Path,
        rounds_dir: str | Path, hooks: Hooks | None = None, ranks: Ranks | None = None) -> dict:
    """Every round's three stages in one process (the pretrain stage, tests, benchmarks), each
    writing its folder under `rounds_dir` as the DVC stages do, then `finish` into `out_dir`.
    `shard` gives the initial shard of every training-set position. A killed run resumes after its
    last complete round. Under several processes (`ranks`) proxy k trains on rank k % world and
    only rank 0 writes shared files and calls the hooks; the weights do not depend on the process
    count."""
    r = start(params, plan, train, shard, rounds_dir, hooks, ranks)
    progress = _resume(r, shard)
    for rnd in range(progress.next_round, plan.rounds):
        counts = train_round(r, progress, rnd)
        if r.ranks.is_main:
            ensemble.average_round(r.rounds.train(rnd + 1), r.rounds.aggregate(rnd + 1))
        r.ranks.barrier()
        profile_round(r, progress, rnd, counts)
        report_round(r, rnd)
        take_average(r, rnd)
    return finish(r, progress, Path(out_dir))


def start(params: Params, plan: Plan, train: ImageSet, shard: np.ndarray, rounds_dir: str | Path,
          hooks: Hooks | None = None, ranks: Ranks | None = None, models: bool = True) -> Run:
    """The run as it stands before its first round: the initial weights, this process's proxies and
    the mitigations (every stage of a round builds it, then loads the round's state). `models`
    False: the proxies without weights (None), no noise schedule and no fingerprint, for a stage
    that needs no model (a one-shard run's profile, which scores nothing): it never loads diffusers."""
    ranks = ranks or Ranks(device=resolve_device(params.train.device))
    torch.set_num_threads(params.train.threads)
    seed = params.seeds.train
    owned = ranks.owned(plan.shards)
    steps = plan.rounds * plan.steps_per_round  # of each proxy
    proxies, noise_schedule, run_fingerprint = dict.fromkeys(owned), None, ""
    if models:
        init = initial_unet(params, seed)
        proxies = {k: new_proxy(init, params, derived_seed(seed, seeds.PROXY, k), ranks.device, steps) for k in owned}
        noise_schedule = build_scheduler(params.model)
        run_fingerprint = checkpoint.fingerprint(params, plan, train.images, shard, init, ranks.device)
    mitigations = Mitigations(plan.mitigations, params, len(train), tuple(owned), ranks.device,
                              warmup_steps(params, steps), train.images)
    for k, proxy in proxies.items():
        if proxy is not None:
            mitigations.attach(k, proxy)
    # the training set lives on the device: a step gathers its batch there, nothing crosses the bus
    return Run(params, plan, train, train.to_tensor().to(ranks.device), noise_schedule, proxies, mitigations,
               Rounds(rounds_dir), run_fingerprint, hooks or Hooks(), ranks, _groups(params, plan, train),
               _duplicated(train))


def _duplicated(train: ImageSet) -> np.ndarray:
    from pipeline.core.dedup import duplicate_groups

    groups = duplicate_groups(train.images)
    return groups.sizes[groups.group] > 1


def _groups(params: Params, plan: Plan, train: ImageSet) -> np.ndarray | None:
    """With iet.split: groups, the near-duplicate group of each position, which MSR moves whole."""
    if params.iet.split != "groups" or plan.shards < 2:
        return None
    from pipeline.core.dedup import near_duplicate_groups

    return near_duplicate_groups(train.images, params.iet.near_duplicate).group


def _resume(r: Run, shard: np.ndarray) -> Progress:
    """After the last complete round of this very run in its rounds folder, else a fresh start;
    what a killed attempt or an earlier run left beyond that is removed."""
    done = r.rounds.complete(r.plan.rounds)
    while done and read_json(r.rounds.train(done) / TRAIN_INFO).get("fingerprint") != r.fingerprint:
        done -= 1
    if r.ranks.is_main:
        for folder in r.rounds.stale(done):
            shutil.rmtree(folder)
    r.ranks.barrier()
    if not done:
        return Progress(shard)
    if r.ranks.is_main:
        print(f"resuming {r.rounds.root} after round {done} of {r.plan.rounds}")
    return restore_round_end(r, done - 1)


def restore_trained(r: Run, rnd: int) -> tuple[Progress, RoundCounts]:
    """The run as round `rnd`'s train stage left it (what its aggregate and profile stages read)."""
    _require(r, "train", rnd)
    # no check of the run's fingerprint here: DVC re-runs what a change reaches, and a round whose
    # stage reads none of the changed keys (train@1 under a new msr.skip_rate) is rightly reused
    shard, counts, _ = checkpoint.load_trained(r.rounds.train(rnd + 1), r.proxies, r.mitigations)
    history = [row for q in range(1, rnd + 2) for row in read_json(r.rounds.train(q) / TRAIN_INFO)["curves"]]
    seconds = sum(read_json(r.rounds.profile(q) / ROUND_INFO)["round_seconds"] for q in range(1, rnd + 1))
    return (Progress(shard, rnd, seconds, history),
            RoundCounts(counts["drawn"].to(r.ranks.device), counts["skipped"].to(r.ranks.device)))


def restore_round_end(r: Run, rnd: int) -> Progress:
    """The run as round `rnd` ended (what the next round's train stage and `finish` start from):
    the proxies as trained, the mitigations' state and shards after the profile, the average taken."""
    progress, _ = restore_trained(r, rnd)
    _require(r, "aggregate", rnd)
    _require(r, "profile", rnd)
    progress.shard = checkpoint.load_profiled(r.rounds.profile(rnd + 1), r.proxies, r.mitigations)
    progress.seconds += read_json(r.rounds.profile(rnd + 1) / ROUND_INFO)["round_seconds"]
    progress.next_round = rnd + 1
    take_average(r, rnd)
    return progress


def _require(r: Run, phase: str, rnd: int) -> None:
    if not r.rounds.done(phase, rnd + 1):
        raise FileNotFoundError(f"{r.rounds.round(rnd + 1) / phase}: round {rnd + 1}'s {phase} stage has not run "
                                "(dvc repro runs the stages in order)")


def take_average(r: Run, rnd: int) -> None:
    """Every proxy takes round `rnd`'s average (the authors' ring MSR: after even rounds and the last only)."""
    if r.mitigations.averages(rnd, r.plan.rounds):
        checkpoint.load_average(r.rounds.aggregate(rnd + 1), r.proxies)


def train_round(r: Run, progress: Progress, rnd: int) -> RoundCounts:
    """The train stage of round `rnd`: every proxy trains on its shard; its folder holds the state
    after it, the mid-round weights and the weights the aggregate stage averages with."""
    t0 = time.perf_counter()
    counts = train_proxies(r, progress, rnd)
    sizes = r.mitigations.weights(np.bincount(progress.shard, minlength=r.plan.shards).tolist())
    info = {"fingerprint": r.fingerprint, "round": rnd + 1, "shards": r.plan.shards, "processes": r.ranks.world,
            "checkpoints_per_round": r.plan.checkpoints_per_round, "aggregation_weights": [float(w) for w in sizes],
            "seconds": time.perf_counter() - t0, "curves": [row for row in progress.history if row["round"] == rnd],
            "round_metrics": r.mitigations.round_metrics()}  # what training counted, which a profile process cannot see
    checkpoint.save_trained(r.rounds.train(rnd + 1), r.proxies, r.mitigations, counts, progress.shard,
                            dict(sorted(r.midpoints.items())), info, r.ranks)
    r.midpoints.clear()
    return counts


def profile_round(r: Run, progress: Progress, rnd: int, counts: RoundCounts) -> None:
    """The profile stage of round `rnd`: with K > 1 the loss table and the mitigations' round end
    (MSR's moves, the next round's shards); its folder holds what changed and the round's metrics."""
    t0 = time.perf_counter()
    folder = r.rounds.profile(rnd + 1)
    with checkpoint.shared_folder(folder, r.ranks) as tmp:
        trained = read_json(r.rounds.train(rnd + 1) / TRAIN_INFO)
        metrics = {**trained["round_metrics"], **end_round(r, progress, rnd, counts, tmp)}
        checkpoint.save_profiled(tmp, r.proxies, r.mitigations, progress.shard, r.ranks)
        metrics.update(round_train_seconds=trained["seconds"], round_seconds=trained["seconds"] + time.perf_counter() - t0)
        if r.ranks.is_main:
            write_json(tmp / ROUND_INFO, metrics)
    progress.seconds += metrics["round_seconds"]
    progress.next_round = rnd + 1


def report_round(r: Run, rnd: int) -> None:
    """Hand round `rnd`'s metrics, profile folder and averaged model to the hooks, from its folders:
    in the stages the stage after its profile does it (the next round's train, or finish), which
    talks to MLflow anyway, so that the profile stage needs no MLflow."""
    if not r.ranks.is_main:
        return
    folder = r.rounds.profile(rnd + 1)
    with tempfile.TemporaryDirectory() as tmp:
        averaged = _save_average(r, rnd, Path(tmp)) if r.hooks.logs_models else None
        r.hooks.round_done(rnd, read_json(folder / ROUND_INFO), folder, averaged)


def _save_average(r: Run, rnd: int, folder: Path) -> Path:
    """Round `rnd`'s averaged weights as a saved pipeline in `folder` (for MLflow)."""
    model = copy.deepcopy(r.proxies[min(r.proxies)].model)
    model.load_state_dict(load_file(str(r.rounds.aggregate(rnd + 1) / "aggregated.safetensors")))
    save_pipeline(model, r.noise_schedule, folder)
    return folder


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
    the train stage to save and the aggregate stage to average into checkpoint_JJ.safetensors. For evaluation
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


def end_round(r: Run, progress: Progress, rnd: int, counts: RoundCounts, folder: Path) -> dict:
    """With K > 1, score the samples under the proxies' end-of-round weights (the loss table) and
    let the mitigations act on it (MSR moves samples); write the round's tables. Returns the
    round's metrics."""
    drawn, skipped = counts.drawn.cpu().numpy(), counts.skipped.cpu().numpy()
    skip_rate = np.where(drawn > 0, skipped / np.maximum(drawn, 1), 0.0)
    metrics = {"moved": 0}
    if r.plan.shards > 1:
        t0 = time.perf_counter()
        profile = LossTable(r.proxies, r.images, r.noise_schedule, r.ranks, r.plan.shards, r.params.msr.profile_timesteps,
                            derived_seed(r.params.seeds.train, seeds.PROFILE, rnd), r.mitigations)
        profile.score(np.ones((len(r.train), r.plan.shards), dtype=bool) if r.params.msr.profile == "all"
                      else progress.shard[:, None] == np.arange(r.plan.shards))
        end = RoundEnd(progress.shard, skip_rate, profile.losses, profile.rows, r.groups, round=rnd)
        r.mitigations.end_round(end)
        metrics["profile_seconds"] = time.perf_counter() - t0
        if r.ranks.is_main:
            _write_loss_table(r, folder, progress.shard, drawn, skipped, skip_rate, profile.losses, end.moves)
        progress.shard, metrics["moved"] = end.shard, len(end.moves)
    if r.ranks.is_main:
        write_csv(folder / "shards.csv",
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


def _write_loss_table(r: Run, folder: Path, shard, drawn, skipped, skip_rate, losses, moves) -> None:
    ids = r.train.ids
    table = [{"sample_id": int(ids[i]), "shard": int(shard[i]), "drawn": int(drawn[i]),
              "skipped": int(skipped[i]), "skip_rate": float(skip_rate[i]), "loss_own": _cell(losses[i, shard[i]]),
              **{f"loss_proxy_{k}": _cell(losses[i, k]) for k in range(r.plan.shards)}}
             for i in range(len(ids))]
    write_csv(folder / "loss_table.csv", table, list(table[0]))
    write_csv(folder / "moves.csv", [{"sample_id": int(ids[m["position"]]),
                                                   **{k: v for k, v in m.items() if k != "position"}} for m in moves],
               ["sample_id", "from", "to", "skip_rate", "loss_from", "loss_to"])


def finish(r: Run, progress: Progress, out_dir: Path) -> dict:
    """Write curves.csv, the final models (raw averaged weights and EMA) and train_info.json into
    `out_dir` (the run as its last round ended). Returns the summary."""
    plan = r.plan
    steps = plan.shards * plan.rounds * plan.steps_per_round
    summary = {"train_seconds": round(progress.seconds, 2), "optimizer_steps": steps,
               "images_seen": steps * r.params.train.batch_size, "shards": plan.shards, "rounds": plan.rounds,
               "variant": plan.variant, **{name: name in plan.mitigations for name in mitigation.REGISTRY},
               "processes": read_json(r.rounds.train(plan.rounds) / TRAIN_INFO)["processes"], **r.mitigations.summary()}
    if not r.ranks.is_main:
        r.ranks.barrier()
        return summary
    fields = ["round", "proxy", "step", "loss", "kept"] + sorted({k for row in progress.history for k in row}
                                                                  - {"round", "proxy", "step", "loss", "kept"})
    final = r.proxies[0]  # every proxy holds the average; proxy 0 lives on rank 0
    with staged_folder(out_dir) as tmp:  # a kill or a full disk leaves the previous outputs or none, never half
        write_csv(tmp / "curves.csv", progress.history, fields)
        save_pipeline(final.model, r.noise_schedule, tmp / "model")
        final.ema.copy_to(final.model.parameters())
        save_pipeline(final.model, r.noise_schedule, tmp / "model_ema")
        write_json(tmp / "train_info.json", summary)
    r.ranks.barrier()
    return summary
