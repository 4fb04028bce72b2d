"""A run killed with SIGKILL (no handler, no cleanup) and started again ends with the same weights,
bit for bit, as an uninterrupted run with the same seed: the loop in one process (the pretrain
stage) from its round folders, `dvc repro` from its first unfinished stage."""
import os
import re
import shutil
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
from pipeline.core.layout import Rounds
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
    """Two runs' outputs (a/out, b/out) and round folders (a/state, b/state)."""
    wa, wb = _weights(a / "out"), _weights(b / "out")
    for m in wa:
        assert wa[m].keys() == wb[m].keys()
        assert all(torch.equal(wa[m][k], wb[m][k]) for k in wa[m]), m
    assert (a / "out/curves.csv").read_text() == (b / "out/curves.csv").read_text()
    for r in range(1, resume_worker.TINY["iet"]["rounds"] + 1):
        for f in ("shards.csv", "loss_table.csv", "moves.csv"):
            assert (a / f"state/round_{r}/profile/{f}").read_text() == (b / f"state/round_{r}/profile/{f}").read_text()


def test_sigkill_mid_round_then_restart_gives_the_same_weights(tmp_path):
    proc, log = _start(tmp_path, "--pause-at", "2")
    resume_worker.run(tmp_path / "reference/out", tmp_path / "reference/state")  # meanwhile, uninterrupted
    try:
        _wait_for(tmp_path / "out.paused", proc, log)        # round 3 under way: proxy 0 trained
        assert Rounds(tmp_path / "state").complete() == 2
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(30) == -signal.SIGKILL
    finally:
        proc.kill()
    assert not (tmp_path / "out/model").exists()

    proc, log = _start(tmp_path)
    assert proc.wait(300) == 0
    log.seek(0)
    assert "after round 2 of 6" in log.read()  # resumed, not started over
    _assert_same_run(tmp_path / "reference", tmp_path)


def test_sigkill_at_arbitrary_moments_never_corrupts_the_resume_state(tmp_path):
    resume_worker.run(tmp_path / "reference/out", tmp_path / "reference/state")
    out = subprocess.run([sys.executable, str(WORKER), str(tmp_path / "out"), str(tmp_path / "state"),
                          "--chaos", "8", "0"], env=ENV, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert out.stdout.count("killed") >= 4 and "resuming" in out.stdout, out.stdout
    _assert_same_run(tmp_path / "reference", tmp_path)


@pytest.mark.slow
def test_dvc_repro_after_a_sigkill_resumes_at_the_first_unfinished_stage(project):
    """`dvc repro` killed (with its stage process, as a crash or a killed job would) during the IET
    model's rounds, then run again: no manual clean-up, the finished round stages are not run
    again, and the model is the one an uninterrupted run gives. DVC removes the dead process from
    .dvc/tmp/rwlock by itself."""
    repo, env = project
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["iet"].update({"local_epochs": 30})  # rounds of about a second: time to kill
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**env, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    log = open(repo.parent / "first.log", "w+")
    proc = subprocess.Popen(["dvc", "repro", "iet_finish"], cwd=repo, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        # round 2 under way: DVC recorded round 1's stages in dvc.lock before it started the next one
        _wait_for(repo / "runs/iet/rounds/round_2", proc, log, timeout=300)
        os.killpg(proc.pid, signal.SIGKILL)  # dvc and the stage process it started
        proc.wait(30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert not (repo / "runs/iet/train_info.json").exists()

    again = _run(["dvc", "repro", "iet_finish"], repo, env)
    ran = set(re.findall(r"Running stage '([^']+)'", again))
    assert "iet_finish" in ran and not ran & {"iet_train@1", "aggregate@iet-1", "iet_profile@1"}, again
    assert "Data and pipelines are up to date" in _run(["dvc", "status", "iet_finish"], repo, env)
    resumed = _weights(repo / "runs/iet")

    shutil.rmtree(repo / "runs/iet")  # an uninterrupted run: every round stage again, not from DVC's run cache
    _run(["dvc", "repro", "--no-run-cache", "iet_finish"], repo, env)
    straight = _weights(repo / "runs/iet")
    assert all(torch.equal(resumed[m][k], straight[m][k]) for m in resumed for k in resumed[m])
