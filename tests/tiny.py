"""The tiny run the tests train, in one place: an 8x8 UNet of widths (8, 16) without attention and
10 timesteps (AGC's per-timestep banks fill within a few steps), K=3 shards. A test states only
what it changes: `tiny(iet={"rounds": 1})` is the base with that one key replaced."""
from __future__ import annotations

import copy
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]

ARCH = {"block_out_channels": [8, 16], "attention": False, "num_train_timesteps": 10}
BASE = {"data": {"train_size": 12, "resolution": 8, "duplicates": {"images": 0, "copies": 16, "near": False}},
        "model": ARCH,
        "train": {"batch_size": 8, "warmup_share": 0.05, "threads": 1},
        "eval": {"ddim_steps": 10},
        "iet": {"shards": 3, "rounds": 2, "local_epochs": 6}}


def tiny(**groups: dict) -> dict:
    """A fresh copy of BASE with each given group's keys replaced (other keys of the group kept)."""
    out = copy.deepcopy(BASE)
    for group, values in groups.items():
        out.setdefault(group, {}).update(copy.deepcopy(values))
    return out


def arch(**changes):
    """The tiny architecture as a ModelConfig."""
    from pipeline.core.config import ModelConfig

    return ModelConfig(**{**ARCH, **changes})


def dvc_stage(stage: str) -> dict:
    """A stage's definition in dvc.yaml (a foreach stage's `do` block)."""
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"][stage]
    return spec.get("do", spec)


def dvc_paths(entries) -> list[str]:
    """The paths of a stage's deps, outs, metrics or plots list (each entry a path or {path: options})."""
    return [e if isinstance(e, str) else next(iter(e)) for e in entries or []]


def dvc_args(stage: str, item: str | None = None) -> list[str]:
    """The arguments dvc.yaml gives the stage's module (`item`: a foreach stage's key, such as a
    model or a round, or `<model>-<round>` for aggregate), so that a test calling the stage's click
    main passes the paths `dvc repro` passes."""
    cmd = dvc_stage(stage)["cmd"].replace("${item}", item or "").replace("${key}", item or "")
    if item and "-" in item:
        model, rnd = item.rsplit("-", 1)
        cmd = cmd.replace("${item.model}", model).replace("${item.round}", rnd)
    words = shlex.split(cmd)
    return words[words.index("-m") + 2:]


def run(args, cwd, env, ok=True) -> str:
    """A command's output; fails the test, showing the output's end, when its exit status is not
    what `ok` says."""
    out = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    assert (out.returncode == 0) == ok, f"{' '.join(args)}: rc {out.returncode}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout + out.stderr


def project_copy(dest: Path, groups: dict) -> tuple[Path, dict]:
    """A fresh-clone-like git repository at `dest` (tracked and untracked-but-not-ignored files) whose
    params.yaml has `groups`' keys replaced, and the environment to run dvc and the stages in."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split()
    for f in files:
        if (ROOT / f).is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, dest / f)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for group, values in groups.items():
        params[group].update(values)
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    from pipeline.train.dag import set_rounds

    set_rounds(params["iet"]["rounds"], dest / "dvc.yaml", dest / "params.yaml")  # `iet-agc rounds N`
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "GIT_AUTHOR_NAME": "t",
           "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    env.pop("MLFLOW_TRACKING_URI", None)
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "tiny"]):
        run(cmd, dest, env)
    return dest, env


def random_train(n: int = 12):
    """The tiny runs' training set: n random 8x8 grey images of 3 classes, ids from 100."""
    import numpy as np

    from pipeline.core.data import ImageSet

    g = np.random.default_rng(0)
    return ImageSet(images=g.integers(0, 256, (n, 1, 8, 8), dtype=np.uint8), labels=np.arange(n) % 3,
                    ids=np.arange(100, 100 + n))


class Stop(Exception):
    """Raised by StopAfterRound: a run interrupted between rounds."""


def stop_after_round(last: int):
    """round-loop hooks that stop the run once round `last` (0-based) has ended, its folders
    written: a resumed run starts at round last + 1."""
    from pipeline.train import rounds

    class StopAfterRound(rounds.Hooks):
        def round_done(self, rnd, metrics, folder, averaged=None):
            if rnd == last:
                raise Stop

    return StopAfterRound()


def synthetic_curve(memorization, shifts, samples: int = 64, seed: int = 0):
    """A frontier.Curve of one run: at checkpoint c, a share memorization[c] of its samples
    memorized and its features the reference's distribution shifted by shifts[c] (0: as good as
    real images); 2 held-out images, none memorized."""
    import numpy as np

    from pipeline.evaluate.frontier import Curve

    g = np.random.default_rng(seed)
    reference = g.normal(size=(256, 4))
    memorized = np.array([np.arange(samples) < round(m * samples) for m in memorization])
    features = np.stack([g.normal(size=(samples, 4)) + s for s in shifts])
    return Curve(np.arange(1, len(shifts) + 1, dtype=float) / len(shifts), memorized, features, reference,
                 np.zeros(2, bool))
