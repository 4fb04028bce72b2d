"""What the training stages share: read the shard assignment, report to MLflow, and either run one
stage of a round (`round_stage`: train, profile or finish of the baseline or the IET model, DVC
stages of their own) or the whole loop in one process under a lock on its resume folder
(`train_model`: the pretrain stage, long enough to need its own resume)."""
from __future__ import annotations

import csv
import fcntl
import os
import shutil
from contextlib import nullcontext
from pathlib import Path

import click
import numpy as np

from pipeline.train import rounds
from pipeline.core.config import Params, resolve_device
from pipeline.core.data import ImageSet
from pipeline.core.distributed import Ranks


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
    """Train every round in one process into `out`, with the rounds' folders in `state` (resumed
    after a kill, removed at the end). Under `accelerate launch` every rank runs this; rank 0 alone
    talks to MLflow and holds the lock. `name`: the MLflow run's; `data`: the files read, MLflow
    dataset context -> path; `tracked`: the params the pipeline's MLflow run is found by and
    records, when `p` is a stage's own variant of them (the pretrain stage trains from scratch
    whatever model.init_from says)."""
    from pipeline.track.tracking import Tracker, TrainingHooks

    ranks = Ranks.from_environment(p.train.device)
    state = Path(state)
    if not ranks.is_main:
        rounds.run(p, plan, train, shard, out, state, ranks=ranks)
        return
    _check_writable(state)
    tracker = Tracker(tracked or p)
    run_id = _new_model_run(tracker, name, plan, ranks, data)
    # A killed `dvc repro` can leave its stage process running; two trainers on one resume state
    # would overwrite each other. The OS drops the lock when its holder dies, even on SIGKILL.
    with open(state.with_name(state.name + ".lock"), "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            tracker.finish(run_id, "FAILED")
            raise click.ClickException(f"another process is already training {name} ({state}.lock is held): "
                                       "let it finish or stop it, then run again") from None
        with tracker.system_metrics(run_id):
            summary = rounds.run(p, plan, train, shard, out, state, hooks=TrainingHooks(tracker, run_id), ranks=ranks)
    shutil.rmtree(state, ignore_errors=True)
    tracker.log_metrics(run_id, summary)
    tracker.finish(run_id)
    click.echo(f"{name}: {summary}")


def _new_model_run(tracker, name: str, plan: rounds.Plan, ranks: Ranks, data: dict | None) -> str:
    run_id = tracker.child(name)
    tracker.log_params(run_id, {"shards": plan.shards, "rounds": plan.rounds, "steps_per_round": plan.steps_per_round,
                                "variant": plan.variant, "mitigations": ",".join(plan.mitigations) or "none",
                                "processes": ranks.world})
    tracker.log_data(run_id, data or {})
    return run_id


def round_stage(model: str, phase: str, rnd: int, p: Params, train: ImageSet, shard: np.ndarray,
                rounds_dir: Path, out: Path | None = None, data: dict[str, str | Path] | None = None) -> None:
    """One stage of round `rnd` (from 0) of `model` (baseline | iet): `phase` train, profile or
    finish (into `out`, after the last round). The model's MLflow run is opened by its first train
    stage and reopened by every later one; finish closes it. The profile stage does not log
    (rounds.report_round says why) and so never loads MLflow, nor, with one shard, diffusers."""
    plan = rounds.Plan.baseline(p) if model == "baseline" else rounds.Plan.iet(p)
    ranks = Ranks.from_environment(p.train.device) if phase != "finish" else Ranks(device=resolve_device(p.train.device))
    hooks = None
    if ranks.is_main and phase != "profile":
        from pipeline.track.tracking import Tracker, TrainingHooks  # MLflow: seconds to import

        tracker = Tracker(p)
        run_id = (tracker.reopen(model) if (phase, rnd) != ("train", 0) else None) or \
            _new_model_run(tracker, model, plan, ranks, data)
        hooks = TrainingHooks(tracker, run_id)
    r = rounds.start(p, plan, train, shard, rounds_dir, hooks, ranks, models=phase != "profile" or plan.shards > 1)
    if phase == "train":
        progress = rounds.Progress(shard) if rnd == 0 else rounds.restore_round_end(r, rnd - 1)
        if rnd > 0:
            rounds.report_round(r, rnd - 1)
        with hooks.tracker.system_metrics(hooks.run_id) if hooks else nullcontext():
            rounds.train_round(r, progress, rnd)
    elif phase == "profile":
        progress, counts = rounds.restore_trained(r, rnd)
        rounds.profile_round(r, progress, rnd, counts)
    else:
        progress = rounds.restore_round_end(r, plan.rounds - 1)
        rounds.report_round(r, plan.rounds - 1)
        summary = rounds.finish(r, progress, out)
        hooks.tracker.log_metrics(hooks.run_id, summary)
        hooks.tracker.finish(hooks.run_id)
        click.echo(f"{model}: {summary}")
        return
    if hooks is not None:
        hooks.tracker.pause(hooks.run_id)


def run_round_stage(model: str, phase: str, rnd: int | None, params_path: Path, train_path: Path,
                    shards_path: Path | None, pretrained: Path, rounds_dir: Path, out: Path | None = None) -> None:
    """A round stage's command (stages/train.py, profile.py, finish.py): read and check its inputs,
    then `round_stage`. `rnd` counts from 1, as the DVC stages do; None: after the last round."""
    from pipeline.core.config import load_params

    p = load_params(params_path)
    resolve_device(p.train.device)  # an absent device fails here, before any work
    check_pretrained(p, pretrained)
    if rnd is not None and rnd > p.iet.rounds:
        raise click.ClickException(f"--round {rnd}: iet.rounds is {p.iet.rounds}")
    train = ImageSet.load(train_path)
    if model == "iet" and shards_path is None:
        raise click.ClickException("the IET model's stages need --shards (the split stage's shards.csv)")
    shard = (read_shards(shards_path, train, p.iet.shards) if model == "iet"
             else np.zeros(len(train), dtype=np.int64))
    round_stage(model, phase, p.iet.rounds - 1 if rnd is None else rnd - 1, p, train, shard, rounds_dir, out,
                data={"train": train_path})
