"""Soak: a bounded fault loop on tiny params, not in the default suite nor CI's (`pytest -m soak -s
tests/test_soak.py`; SOAK_N=<iterations>, default 6). Each iteration changes agc.tau, starts
`dvc repro iet_finish`, kills DVC and its stage (SIGKILL or SIGTERM) at a random moment of the IET
model's round stages or (one time in three) runs it out of disk space, sometimes truncates a
random file of its round folders (runs/iet/rounds), and runs `dvc repro iet_finish` again. Each
time: the run completes with no manual step, its weights equal an uninterrupted run's bit for bit
(same machine), and the MLflow store holds no RUNNING run. The seed of the faults is printed, so a
failure can be replayed (SOAK_SEED)."""
import os
import random
import signal
import subprocess
import time

import pytest
import torch
import yaml
from mlflow import MlflowClient
from safetensors.torch import load_file

from test_e2e import TINY, _run
from tiny import project_copy

pytestmark = pytest.mark.soak
TAUS = ("0.6", "0.9")
SOAK = {**TINY, "iet": {"shards": 2, "rounds": 4, "local_epochs": 24}}  # rounds of about a second: time to kill


def _weights(repo):
    return load_file(str(repo / "runs/iet/model/unet/diffusion_pytorch_model.safetensors"))


def _set_tau(repo, tau: str) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["agc"]["tau"] = float(tau)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def _kill_during_training(repo, env, rng) -> str:
    """`dvc repro iet_finish` killed with its stage (SIGKILL or SIGTERM, as `timeout`, Slurm and
    Kubernetes send it, to the process group) at a random moment of its training; returns what was
    done. After a SIGTERM the stage itself marks its runs KILLED: none may be left RUNNING."""
    proc = subprocess.Popen(["dvc", "repro", "iet_finish"], cwd=repo, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 300
    while not (repo / "runs/iet/rounds").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(rng.uniform(0, 3))
    sig = rng.choice([signal.SIGKILL, signal.SIGTERM])
    finished = proc.poll() is not None
    if not finished:
        os.killpg(proc.pid, sig)
    proc.wait(30)
    if finished:
        return "finished before the kill"
    _wait_for_group(proc.pid)
    if sig == signal.SIGTERM:
        assert _running_runs(repo) == [], "a run left RUNNING by SIGTERM"
    return f"killed ({sig.name})"


def _full_disk_during_training(repo, env, rng) -> str:
    """`dvc repro iet_finish` with the IET model's rounds folder on a tmpfs too small for its rounds:
    a stage fails on it, saying so, with no run left RUNNING; then the disk is freed (the tmpfs goes
    with what it held) for the rerun. Where no tmpfs can be mounted (not root), a kill instead."""
    rounds = repo / "runs/iet/rounds"
    rounds.mkdir(parents=True, exist_ok=True)
    size = rng.choice([1, 2, 4])  # MiB: a round of SOAK's takes about 2.5
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}m", "tmpfs", str(rounds)],
                      capture_output=True).returncode:
        return _kill_during_training(repo, env, rng) + " (no tmpfs here for a full disk)"
    try:
        out = subprocess.run(["dvc", "repro", "iet_finish"], cwd=repo, env=env, capture_output=True, text=True)
    finally:
        subprocess.run(["umount", str(rounds)], check=True)
    said = out.stdout + out.stderr
    assert out.returncode != 0 and "no space left on device" in said.lower(), said[-3000:]
    assert _running_runs(repo) == [], "a run left RUNNING by a full disk"
    return f"full disk ({size} MiB)"


def _wait_for_group(pgid: int, timeout: float = 60) -> None:
    """Until every process of the group (the stage, after DVC) has exited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    raise AssertionError(f"process group {pgid} still running {timeout} s after the signal")


def _truncate_one(repo, rng) -> str:
    files = sorted(p for p in (repo / "runs/iet/rounds").rglob("*") if p.is_file() and p.stat().st_size > 0)
    if not files or rng.random() < 0.5:
        return "nothing truncated"
    victim = rng.choice(files)
    data = victim.read_bytes()
    victim.write_bytes(data[: rng.randrange(len(data))])
    return f"truncated {victim.relative_to(repo)}"


def _running_runs(repo) -> list[str]:
    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    return [r.info.run_name for r in runs if r.info.status == "RUNNING"]


def test_killed_and_corrupted_runs_recover_to_the_uninterrupted_weights(tmp_path):
    n, seed = int(os.environ.get("SOAK_N", "6")), int(os.environ.get("SOAK_SEED", time.time_ns() % 10**6))
    print(f"soak: {n} iterations, SOAK_SEED={seed}")
    rng = random.Random(seed)
    reference_repo, env = project_copy(tmp_path / "reference", SOAK)
    env = {**env, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    references = {}
    for tau in TAUS:
        _set_tau(reference_repo, tau)
        _run(["dvc", "repro", "iet_finish"], reference_repo, env)
        references[tau] = _weights(reference_repo)
    repo, _ = project_copy(tmp_path / "repo", SOAK)
    for i in range(n):
        tau = TAUS[i % len(TAUS)]
        _set_tau(repo, tau)
        fault = _full_disk_during_training if rng.random() < 1 / 3 else _kill_during_training
        what = [fault(repo, env, rng), _truncate_one(repo, rng)]
        out = _run(["dvc", "repro", "iet_finish"], repo, env)
        weights = _weights(repo)
        print(f"  {i + 1}: tau {tau}, {', '.join(what)}; "
              + ("resumed" if "Running stage 'iet_train@1'" not in out else "trained from round 1"))
        assert all(torch.equal(weights[k], references[tau][k]) for k in weights), (i, what)
        assert _running_runs(repo) == [], (i, what)
