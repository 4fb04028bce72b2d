"""A tiny IET run in a process of its own, for tests/test_resume.py to kill with SIGKILL.

    python tests/resume_worker.py OUT ROUNDS [--pause-at ROUND]   one run; with --pause-at it writes
        OUT.paused and waits (to be killed) after the first proxy of ROUND has trained
    python tests/resume_worker.py OUT ROUNDS --chaos N SEED       imports once, then forks the run
        and SIGKILLs the child at an arbitrary moment, N times (or until it finishes), then lets
        a last child finish
"""
import os
import random
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.train import rounds
from pipeline.core.config import parse_params
from pipeline.core.data import ImageSet
from pipeline.train.ensemble import split_shards
from pipeline.core.layout import Rounds
from tiny import tiny

# tau 0.9: AGC skips, TAA strengths rise and MSR moves samples, so all of that state is resumed
TINY = tiny(iet={"rounds": 6}, agc={'tau': 0.9}, msr={'fraction': 0.25, 'max_imbalance': 0.5})


def run(out, state, hooks=None):
    p = parse_params(TINY)
    g = np.random.default_rng(0)
    train = ImageSet(images=g.integers(0, 256, (12, 1, 8, 8), dtype=np.uint8), labels=np.arange(12) % 3,
                     ids=np.arange(100, 112))
    return rounds.run(p, rounds.Plan.iet(p), train, split_shards(train.labels, 3, 0), out, state, hooks=hooks)


class PauseAt(rounds.Hooks):
    def __init__(self, rnd: int, marker: Path):
        self.rnd, self.marker = rnd, marker

    def proxy_round(self, rnd, proxy, curve):
        if rnd == self.rnd and proxy == 0:  # mid round: proxy 0 trained, the others not yet
            self.marker.write_text(str(os.getpid()))
            time.sleep(600)


def _saved_round(state: Path) -> int:
    """The last complete round in the rounds folder, from 0; -1 for none."""
    return Rounds(state).complete() - 1


def _round_seconds(state: Path) -> float:
    """How long the last saved round took, from its files' times (its first proxy's training not
    counted: a round's length, not more)."""
    written = [f.stat().st_mtime for f in Rounds(state).round(_saved_round(state) + 1).rglob("*") if f.is_file()]
    return max(written) - min(written)


def chaos(out: str, state: str, kills: int, seed: int) -> None:
    """SIGKILL the run `kills` times at arbitrary moments, then let it finish. Odd attempts die
    within a round's time of starting (loading the state, building the proxies, training); even ones
    once they have saved one more round, within a round's time after it (training, profiling,
    writing the round's folders), so the run moves on but cannot finish before the kills are spent,
    whatever the machine's speed: the time scale is how long the last saved round took, not a
    constant. Forking spares the seconds of importing torch each time."""
    rng = random.Random(seed)
    for attempt in range(kills + 1):
        before = _saved_round(Path(state))
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                run(out, state)
                code = 0
            finally:
                sys.stdout.flush()
                os._exit(code)
        done, status = 0, 0
        if attempt < kills:
            if attempt % 2 == 0:
                while _saved_round(Path(state)) == before:
                    done, status = os.waitpid(pid, os.WNOHANG)
                    if done:
                        break
                    time.sleep(0.01)
            if not done:
                time.sleep(rng.uniform(0.0, 1.0) * _round_seconds(Path(state)))
            if not done:
                os.kill(pid, signal.SIGKILL)  # a no-op on a child that has just finished: reaped below
        if not done:
            _, status = os.waitpid(pid, 0)
        print(f"attempt {attempt}: {'killed' if os.WIFSIGNALED(status) else os.waitstatus_to_exitcode(status)}",
              flush=True)
        if os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0:
            return
    raise SystemExit("the last attempt did not finish")


if __name__ == "__main__":
    torch.set_num_threads(1)
    out_dir, state_dir, *rest = sys.argv[1:]
    if rest[:1] == ["--chaos"]:
        chaos(out_dir, state_dir, int(rest[1]), int(rest[2]))
    else:
        pause = PauseAt(int(rest[1]), Path(out_dir + ".paused")) if rest[:1] == ["--pause-at"] else None
        run(out_dir, state_dir, pause)
