"""What the two training stages (baseline, iet) share: read the shard assignment, run the round
loop on every rank under a lock on its resume state, report to MLflow."""
from __future__ import annotations

import csv
import fcntl
import os
from pathlib import Path

import click
import numpy as np

from pipeline import rounds
from pipeline.config import Params
from pipeline.data import ImageSet
from pipeline.distributed import Ranks
from pipeline.tracking import Tracker, TrainingHooks


def read_shards(path: str | Path, train: ImageSet, shards: int) -> np.ndarray:
    """Every training sample's initial shard, from the split stage's table; checked before any
    training: a shard that is not an integer in 0..shards-1 (a hand edit, a table of other params)
    failed only after a whole round had trained."""
    table = {}
    with open(path, newline="") as f:
        for line, row in enumerate(csv.DictReader(f), start=2):
            sample, shard = row.get("sample_id"), row.get("shard")
            if not (_is_int(sample) and _is_int(shard)):
                raise click.ClickException(f"{path}: line {line}: sample_id and shard must be integers (got "
                                           f"{sample!r}, {shard!r}); re-run the split stage")
            if not 0 <= int(shard) < shards:
                raise click.ClickException(f"{path}: line {line}: shard {int(shard)} is outside 0..{shards - 1} "
                                           f"(iet.shards is {shards}); re-run the split stage")
            table[int(sample)] = int(shard)
    missing = set(train.ids.tolist()) - table.keys()
    if missing:
        raise click.ClickException(f"{path}: no shard for {len(missing)} training samples; re-run the split stage")
    return np.array([table[i] for i in train.ids.tolist()], dtype=np.int64)


def _is_int(text: str | None) -> bool:
    try:
        int(text)
    except (TypeError, ValueError):
        return False
    return True


def check_pretrained(p: Params, pretrained: str | Path) -> None:
    """A model.init_from inside the pretrain stage's folder needs that stage to have trained one:
    one line saying so, instead of a missing-file error at the model's path."""
    pretrained = Path(pretrained)
    source = p.model.init_from
    if source is None or not Path(source).resolve().is_relative_to(pretrained.resolve()):
        return
    if not (pretrained / "model").is_dir():
        raise click.ClickException(f"model.init_from names {source}, but the pretrain stage trained no model "
                                   f"in {pretrained}: set pretrain.enabled true (-S pretrain.enabled=true)")


def _check_writable(state: Path) -> None:
    """The resume folder must hold the lock and the state: a read-only or misplaced one is said in
    one line before any training (it would fail at the lock, or after the first round)."""
    try:
        state.parent.mkdir(parents=True, exist_ok=True)
        with open(state.with_name(state.name + ".lock"), "a"):
            pass
        for folder in (state.parent, state):
            if folder.is_dir() and not os.access(folder, os.W_OK | os.X_OK):
                raise PermissionError(13, "Permission denied", str(folder))
    except OSError as err:
        raise click.ClickException(f"{err.filename or state}: cannot write the resume state of {state.name} "
                                   f"({err.strerror or err}); make it writable (or remove it) and run again") from None


def train_model(name: str, p: Params, plan: rounds.Plan, train: ImageSet, shard: np.ndarray, out: str | Path,
                state: str | Path, data: dict[str, str | Path] | None = None, tracked: Params | None = None) -> None:
    """Train into `out`, resuming from and saving to the folder `state` after each round. Under
    `accelerate launch` every rank runs this; rank 0 alone talks to MLflow and holds the lock.
    `name`: the MLflow run's; `data`: the files read, MLflow dataset context -> path; `tracked`: the
    params the pipeline's MLflow run is found by and records, when `p` is a stage's own variant of
    them (the pretrain stage trains from scratch whatever model.init_from says)."""
    ranks = Ranks.from_environment(p.train.device)
    state = Path(state)
    if not ranks.is_main:
        rounds.run(p, plan, train, shard, out, state, ranks=ranks)
        return
    _check_writable(state)
    tracker = Tracker(tracked or p)
    run_id = tracker.child(name)
    tracker.log_params(run_id, {"shards": plan.shards, "rounds": plan.rounds, "steps_per_round": plan.steps_per_round,
                                "variant": plan.variant, "mitigations": ",".join(plan.mitigations) or "none",
                                "processes": ranks.world})
    tracker.log_data(run_id, data or {})
    # A killed `dvc repro` can leave its stage process running; two trainers on one resume state
    # would overwrite each other. The OS drops the lock when its holder dies, even on SIGKILL.
    with open(state.with_name(state.name + ".lock"), "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            tracker.finish(run_id, "FAILED")
            raise click.ClickException(f"another process is already training {name} ({state}.lock is held): "
                                       "let it finish or stop it, then run again") from None
        try:
            with tracker.system_metrics(run_id):
                summary = rounds.run(p, plan, train, shard, out, state, hooks=TrainingHooks(tracker, run_id),
                                     ranks=ranks)
        except BaseException:
            tracker.finish(run_id, "FAILED")
            raise
    tracker.log_metrics(run_id, summary)
    tracker.finish(run_id)
    click.echo(f"{name}: {summary}")
