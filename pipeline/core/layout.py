"""The one owner of the round folders' layout: where each round's stages write, and every reader of
them (training's resume, evaluation, the report, MLflow, scripts). A model's rounds live in
`<model dir>/rounds/round_<r>/` (r = 1, 2, ...; the DVC stages `<model>_train@r` etc. name the same
r), one sub-folder per stage of the round:

  train/      proxy_<k>.safetensors   proxy k's whole state at the round's end (pipeline/core/checkpoint.py)
              samples.safetensors     the shards it trained on, draw and skip counts, per-sample state
              midpoint_<jj>_proxy_<k>.safetensors   its weights after j/C of the round (C checkpoints)
              curves.csv, train.json  the proxies' training curves; seconds and aggregation weights
  aggregate/  aggregated.safetensors, aggregated_ema.safetensors, checkpoint_<jj>.safetensors
  profile/    samples.safetensors, mitigations.safetensors   the state the next round starts from
              loss_table.csv, moves.csv, shards.csv, round.json (written last)

Each folder is written whole or not at all (pipeline.core.io.staged_folder)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

PHASES = ("train", "aggregate", "profile")
TRAIN_INFO, SAMPLES, ROUND_INFO = "train.json", "samples.safetensors", "round.json"
DONE = {"train": TRAIN_INFO, "aggregate": "aggregated.safetensors", "profile": ROUND_INFO}  # each written last


@dataclass(frozen=True)
class Rounds:
    """The rounds folder of one model (`runs/<model>/rounds`). Rounds are numbered from 1."""
    root: Path

    def __init__(self, root: str | Path):
        object.__setattr__(self, "root", Path(root))

    def round(self, r: int) -> Path:
        return self.root / f"round_{r}"

    def train(self, r: int) -> Path:
        return self.round(r) / "train"

    def aggregate(self, r: int) -> Path:
        return self.round(r) / "aggregate"

    def profile(self, r: int) -> Path:
        return self.round(r) / "profile"

    def done(self, phase: str, r: int) -> bool:
        return (self.round(r) / phase / DONE[phase]).is_file()

    def complete(self, rounds: int | None = None) -> int:
        """How many rounds from the first are complete (all three phases), at most `rounds`: a
        later round left by a run of more rounds is never read."""
        r = 0
        while (rounds is None or r < rounds) and all(self.done(phase, r + 1) for phase in PHASES):
            r += 1
        return r

    def checkpoints(self, rounds: int | None = None) -> list[tuple[float, Path]]:
        """(training progress in rounds, weights file) of every saved checkpoint, in training order:
        each round's checkpoints within it, then its averaged weights at its end."""
        points = []
        for r in range(1, self.complete(rounds) + 1):
            inner = sorted(self.aggregate(r).glob("checkpoint_*.safetensors"))
            points += [(r - 1 + (j + 1) / (len(inner) + 1), f) for j, f in enumerate(inner)]
            points.append((float(r), self.aggregate(r) / "aggregated.safetensors"))
        if not points:
            raise FileNotFoundError(f"{self.root}: no complete round (round_1/{{train,aggregate,profile}}): "
                                    "re-run the training stages")
        return points

    def loss_tables(self, rounds: int | None = None) -> list[Path]:
        """Every complete round's loss table (none with one shard: nothing is profiled)."""
        tables = [self.profile(r) / "loss_table.csv" for r in range(1, self.complete(rounds) + 1)]
        return [t for t in tables if t.is_file()]

    def stale(self, rounds: int) -> list[Path]:
        """Round folders beyond `rounds`, left by a run of more rounds."""
        return sorted(p for p in self.root.glob("round_*") if p.name[6:].isdigit() and int(p.name[6:]) > rounds)


def proxy_file(k: int) -> str:
    return f"proxy_{k}.safetensors"


def midpoint_file(j: int, k: int) -> str:
    return f"midpoint_{j:02d}_proxy_{k}.safetensors"


def mitigation_file(k: int) -> str:
    return f"mitigations_{k}.safetensors"


def checkpoint_file(j: int) -> str:
    return f"checkpoint_{j:02d}.safetensors"
