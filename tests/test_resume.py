"""A run killed with SIGKILL (no handler, no cleanup) and started again ends with the same weights,
bit for bit, as an uninterrupted run with the same seed."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import resume_worker
from test_e2e import _run, project  # noqa: F401  (a pytest fixture: a temporary git copy on tiny params)

WORKER = Path(__file__).with_name("resume_worker.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}


def _start(tmp_path, *args):
    log = open(tmp_path / f"log_{time.monotonic_ns()}.txt", "w+")
    proc = subprocess.Popen([sys.executable, str(WORKER), str(tmp_path / "out"), str(tmp_path / "state"), *args],
                            env=ENV, stdout=log, stderr=subprocess.STDOUT)
    return proc, log


def _wait_for(path: Path, proc, log, timeout=120):
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            log.seek(0)
            raise AssertionError(f"worker ended ({proc.returncode}) before {path} appeared:\n{log.read()[-3000:]}")
        assert time.monotonic() < deadline, f"{path} did not appear within {timeout} s"
        time.sleep(0.05)


def _weights(out: Path):
    return {m: load_file(str(out / m / "unet/diffusion_pytorch_model.safetensors")) for m in ("model", "model_ema")}


def _assert_same_run(a: Path, b: Path):
    wa, wb = _weights(a), _weights(b)
    for m in wa:
        assert wa[m].keys() == wb[m].keys()
        assert all(torch.equal(wa[m][k], wb[m][k]) for k in wa[m]), m
    assert (a / "curves.csv").read_text() == (b / "curves.csv").read_text()
    for r in range(resume_worker.TINY["iet"]["rounds"]):
        for f in ("shards.csv", "loss_table.csv", "moves.csv"):
            assert (a / f"rounds/round_{r:02d}/{f}").read_text() == (b / f"rounds/round_{r:02d}/{f}").read_text()


def test_sigkill_mid_round_then_restart_gives_the_same_weights(tmp_path):
    proc, log = _start(tmp_path, "--pause-at", "2")
    resume_worker.run(tmp_path / "reference", tmp_path / "reference_state")  # meanwhile, uninterrupted
    try:
        _wait_for(tmp_path / "state/state.json", proc, log)  # the first round's resume state
        _wait_for(tmp_path / "out.paused", proc, log)        # round 2 under way: proxy 0 trained
        assert json.loads((tmp_path / "state/state.json").read_text())["round"] == 1
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(30) == -signal.SIGKILL
    finally:
        proc.kill()
    assert not (tmp_path / "out/model").exists()

    proc, log = _start(tmp_path)
    assert proc.wait(300) == 0
    log.seek(0)
    assert "after round 2 of 6" in log.read()  # resumed, not started over
    _assert_same_run(tmp_path / "reference", tmp_path / "out")
    assert not (tmp_path / "state").exists()


def test_sigkill_at_arbitrary_moments_never_corrupts_the_resume_state(tmp_path):
    resume_worker.run(tmp_path / "reference", tmp_path / "reference_state")
    out = subprocess.run([sys.executable, str(WORKER), str(tmp_path / "out"), str(tmp_path / "state"),
                          "--chaos", "8", "0"], env=ENV, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert out.stdout.count("killed") >= 4 and "resuming" in out.stdout, out.stdout
    _assert_same_run(tmp_path / "reference", tmp_path / "out")


@pytest.mark.slow
def test_dvc_repro_after_a_sigkill_resumes_the_iet_stage(project):
    """`dvc repro` killed (with its stage process, as a crash or a killed job would) during `iet`,
    then run again: no manual clean-up, the stage resumes, and its model is the one an
    uninterrupted run gives. DVC removes the dead process from .dvc/tmp/rwlock by itself."""
    repo, env = project
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["iet"].update({"rounds": 4, "local_epochs": 30})  # rounds of about a second: time to kill
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**env, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    log = open(repo.parent / "first.log", "w+")
    proc = subprocess.Popen(["dvc", "repro", "iet"], cwd=repo, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        _wait_for(repo / "runs/.resume/iet/state.json", proc, log, timeout=300)
        os.killpg(proc.pid, signal.SIGKILL)  # dvc and the stage process it started
        proc.wait(30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert not (repo / "runs/iet/train_info.json").exists()

    again = _run(["dvc", "repro", "iet"], repo, env)
    done = re.search(r"resuming runs/iet after round (\d) of 4", again)
    assert done and 1 <= int(done[1]) < 4, again
    assert sorted(p.name for p in (repo / "runs/iet/rounds").iterdir()) == [f"round_{r:02d}" for r in range(4)]
    assert "Data and pipelines are up to date" in _run(["dvc", "status", "iet"], repo, env)
    assert not (repo / "runs/.resume/iet").exists()

    _run([sys.executable, "-m", "stages.iet", "--train", "data/prepared/train.npz", "--shards", "runs/split/shards.csv",
          "--out", "runs/iet_reference", "--resume", "runs/.resume/iet_reference", "--pretrained", "runs/pretrain"], repo, env)  # uninterrupted
    wa, wb = _weights(repo / "runs/iet"), _weights(repo / "runs/iet_reference")
    assert all(torch.equal(wa[m][k], wb[m][k]) for m in wa for k in wa[m])
