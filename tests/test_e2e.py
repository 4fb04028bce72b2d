"""A full `dvc repro` and a `dvc exp run -S agc.tau=0.8` on tiny params, in a temporary git copy."""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
TINY = {
    "seeds": {"data": 0, "split": 0, "train": 0, "eval": 0},
    "data": {"source": "mnist5k", "path": None, "train_size": 16, "heldout_size": 16, "resolution": 8, "channels": 1},
    "model": {"block_out_channels": [8, 16], "layers_per_block": 1, "attention": False,
              "num_train_timesteps": 10},  # few timesteps: the per-timestep AGC banks fill within a tiny run
    "train": {"batch_size": 8, "lr": 1e-3, "warmup_steps": 2, "grad_clip": 1.0, "ema_decay": 0.9, "threads": 1},
    "iet": {"shards": 2, "rounds": 2, "local_epochs": 8},  # enough steps for tau to change the masks
    "eval": {"num_samples": 16, "ddim_steps": 4, "batch_size": 16, "weights": "raw", "classifier_epochs": 1},
}


def _run(args, cwd, env):
    out = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    assert out.returncode == 0, f"{' '.join(args)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout + out.stderr


def _ran(log):
    return set(re.findall(r"Running stage '([^']+)'", log))


@pytest.fixture
def project(tmp_path):
    """A fresh clone-like copy: tracked and untracked-but-not-ignored files, tiny params."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split()
    dest = tmp_path / "repo"
    for f in files:
        if (ROOT / f).is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, dest / f)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for group, values in TINY.items():
        params[group].update(values)
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    env.pop("MLFLOW_TRACKING_URI", None)
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "tiny"]):
        _run(cmd, dest, env)
    return dest, env


def test_repro_then_tau_experiment_reruns_only_what_depends_on_tau(project):
    repo, env = project
    log = _run(["dvc", "repro"], repo, env)
    all_stages = {"prepare", "split", "features", "baseline", "iet", "evaluate@baseline", "evaluate@iet", "report"}
    assert _ran(log) == all_stages
    report = (repo / "reports/report.md").read_text()
    assert "baseline" in report and "iet" in report and "memorization ratio" in report
    for m in ("baseline", "iet"):
        assert (repo / f"runs/eval/{m}/samples.png").stat().st_size > 0
        assert (repo / f"runs/{m}/model/unet/diffusion_pytorch_model.safetensors").is_file()

    _run(["git", "add", "-A"], repo, env)
    _run(["git", "commit", "-qm", "ran"], repo, env)
    log = _run(["dvc", "exp", "run", "-S", "agc.tau=0.8"], repo, env)
    assert _ran(log) == {"iet", "evaluate@iet", "report"}

    shown = _run(["dvc", "exp", "show", "--csv"], repo, env)
    assert "mem_ratio" in shown and "0.8" in shown

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from mlflow import MlflowClient
    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    exp = client.get_experiment_by_name("iet-agc")
    runs = client.search_runs([exp.experiment_id], max_results=500)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 2  # the repro and the experiment
    for parent in parents:
        assert {"baseline.mem_ratio", "iet.mem_ratio", "baseline.fd", "iet.fd"} <= parent.data.metrics.keys()
        assert parent.data.params["agc.tau"] in ("0.5", "0.8")
    assert {p.data.params["agc.tau"] for p in parents} == {"0.5", "0.8"}
    names = {r.info.run_name for r in runs}
    assert {"baseline", "iet", "evaluate baseline", "evaluate iet", "round 1 proxy 1"} <= names
