"""A full `dvc repro`, a `dvc exp run -S agc.tau=0.8` and back to 0.5 from DVC's run cache on tiny
params, in a temporary git copy; in the slow suite, two queued experiments run at once
(`dvc queue start -j 2`)."""
import csv
import io
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

import pytest
import yaml

from pipeline.core.config import Params
from pipeline.evaluate.frontier import Curve
from tiny import project_copy, run

ROOT = Path(__file__).resolve().parents[1]
TINY = {
    "seeds": {"data": 0, "split": 0, "train": 0, "eval": 0},
    "data": {"source": "mnist5k", "path": None, "train_size": 16, "heldout_size": 16, "resolution": 8, "channels": 1},
    "model": {"block_out_channels": [8, 16], "layers_per_block": 1, "attention": False,
              "num_train_timesteps": 10},  # few timesteps: the per-timestep AGC banks fill within a tiny run
    "train": {"batch_size": 8, "lr": 1e-3, "warmup_share": 0.05, "grad_clip": 1.0, "ema_decay": 0.9, "threads": 1},
    "iet": {"shards": 2, "rounds": 2, "local_epochs": 8},  # enough steps for tau to change the masks
    "eval": {"num_samples": 16, "ddim_steps": 4, "batch_size": 16, "weights": "raw", "classifier_epochs": 1,
             "curve_samples": 8},
}


def _run(args, cwd, env):
    return run(args, cwd, env)


def _ran(log):
    return set(re.findall(r"Running stage '([^']+)'", log))


def _rounds(model: str, rounds: int) -> set[str]:
    """The DVC stages of a model's rounds (train, aggregate, profile of each) and its finish."""
    return {f"{model}_finish"} | {name for r in range(1, rounds + 1)
                                  for name in (f"{model}_train@{r}", f"aggregate@{model}-{r}", f"{model}_profile@{r}")}


# DVC experiment name -> its -S settings and the agc.tau it runs at. tau above the default 0.5: on
# tiny params a lower tau may skip nothing more than 0.5 does, and DVC's run cache then rightly
# restores the evaluation unrun. The second is a new mitigation (the augmentation baseline): it must
# show up in the report, the figure and the ablation with no edit outside its own files.
# (The workspace's params are the tau-0.8 experiment's when they are queued: the augmentation one keeps it.)
QUEUED = {"tau-07": (["agc.tau=0.7"], "0.7"), "augment": (["agc.enabled=false", "augment.enabled=true"], "0.5")}
QUEUE_TIMEOUT_S = 900


def _wait_for_queue(repo, env):
    """`dvc queue start` returns at once: poll until no queued or running task is left."""
    deadline = time.monotonic() + QUEUE_TIMEOUT_S
    while True:
        status = _run(["dvc", "queue", "status"], repo, env)
        rows = [line.split() for line in status.splitlines()]
        states = {r[1]: r[-1] for r in rows if len(r) >= 4 and r[1] in QUEUED}  # Task Name Created Status
        if len(states) == len(QUEUED) and all(v in ("Success", "Failed") for v in states.values()):
            break
        assert time.monotonic() < deadline, f"queue not done after {QUEUE_TIMEOUT_S} s:\n{status}"
        time.sleep(5)
    for name, state in states.items():
        if state != "Success":
            logs = subprocess.run(["dvc", "queue", "logs", name], cwd=repo, env=env, capture_output=True, text=True)
            pytest.fail(f"queued experiment {name} {state}:\n{logs.stdout[-4000:]}\n{logs.stderr[-2000:]}")


@pytest.fixture
def project(tmp_path):
    """A fresh clone-like copy with tiny params."""
    return project_copy(tmp_path / "repo", TINY)


def _stale(repo, env) -> set[str]:
    return set(json.loads(_run(["dvc", "status", "--json"], repo, env).splitlines()[-1] or "{}"))


def _stale_stages_follow_what_changed(repo, env):
    """Where results are logged re-runs only what reads it; the sampler's code re-runs what runs its
    package (the evaluations, the report, the classifier), never training."""
    params = (repo / "params.yaml").read_text()
    (repo / "params.yaml").write_text(params.replace("alias: candidate", "alias: production"))
    assert _stale(repo, env) == {"validate", "register"}  # validate re-checks; its marker stays the same
    (repo / "params.yaml").write_text(params.replace("skip_rate: 0.5", "skip_rate: 0.3"))
    stale = _stale(repo, env)  # the loss profile's key: round 1's training is not affected
    assert "iet_profile@1" in stale and not {"iet_train@1", "baseline_train@1", "baseline_profile@1"} & stale, stale
    (repo / "params.yaml").write_text(params)
    sampler = (repo / "pipeline/evaluate/sampling.py").read_text()
    (repo / "pipeline/evaluate/sampling.py").write_text(sampler + "\n# touched\n")
    # dvc.yaml lists code by package: every stage that runs pipeline/evaluate/, and no training stage
    assert _stale(repo, env) == {"features", "fid_reference", "pretrain_check", "evaluate@baseline", "evaluate@iet",
                                 "report", "register"}
    (repo / "pipeline/evaluate/sampling.py").write_text(sampler)
    assert _stale(repo, env) == set()


def _copy_rounds(repo) -> int:
    return yaml.safe_load((repo / "params.yaml").read_text())["iet"]["rounds"]


def _repro_and_check(repo, env) -> None:
    """`dvc repro` runs every stage once and makes every output; the registered model samples."""
    log = _run(["dvc", "repro"], repo, env)
    rounds = _copy_rounds(repo)
    all_stages = {"validate", "prepare", "split", "features", "fid_reference", "pretrain", "pretrain_check",
                  *_rounds("baseline", rounds), *_rounds("iet", rounds), "evaluate@baseline", "evaluate@iet", "report", "register"}
    assert _ran(log) == all_stages
    report = (repo / "reports/report.md").read_text()
    assert "baseline" in report and "iet" in report and "memorization ratio" in report
    for m in ("baseline", "iet"):
        assert (repo / f"runs/eval/{m}/samples.png").stat().st_size > 0
        assert (repo / f"runs/{m}/model/unet/diffusion_pytorch_model.safetensors").is_file()
        # the curve over training: iet.checkpoints_per_round points a round for both models, each a fraction
        curve = list(csv.DictReader(open(repo / f"runs/eval/{m}/rounds.csv")))
        per_round = Params().iet.checkpoints_per_round
        assert [float(r["round"]) for r in curve] == pytest.approx(
            [i / per_round for i in range(1, rounds * per_round + 1)]), curve
        samples = Curve.load(repo / f"runs/eval/{m}/curve.npz")  # the same checkpoints, each sample's flags
        assert samples.memorized.shape == (len(curve), TINY["eval"]["curve_samples"])
        assert samples.memorized.mean(1) == pytest.approx([float(r["mem_ratio"]) for r in curve])
        assert all(0.0 <= float(r["mem_ratio"]) <= 1.0 and float(r["fd"]) >= 0 for r in curve), curve
        metrics = json.loads((repo / f"runs/eval/{m}/metrics.json").read_text())
        assert 0.0 <= metrics["mia_auc_low"] <= metrics["mia_auc"] <= metrics["mia_auc_high"] <= 1.0, metrics
        copied = list(csv.DictReader(open(repo / f"runs/eval/{m}/copied.csv")))
        assert len(copied) == metrics["unique_images"]
        assert sum(int(r["copies"]) > 0 for r in copied) == metrics["distinct_copied"]
    summary = json.loads((repo / "reports/summary.json").read_text())
    assert {"iet.mem_matched", "iet.mem_matched_low", "iet.mem_matched_p", "iet.frontier_area", "iet.mia_auc",
            "iet.distinct_copied", "risk.risk_skip_auc"} <= summary.keys(), sorted(summary)
    # the report leads with the answer in words (one seed a side: exploratory, never a verdict)
    lead = report.splitlines()[2]
    assert lead.startswith("**IET-AGC+ vs baseline at matched quality: "), lead
    assert "## At matched quality" in report
    assert (repo / "reports/risk.png").stat().st_size > 0 and (repo / "reports/frontier.png").stat().st_size > 0

    # the registered model samples with one command
    # the console script's code as this copy has it (pyproject's entry point: test_cli checks it),
    # not whatever an older editable install left in the virtual environment's bin/
    cli = [sys.executable, "-m", "commands.cli"]
    _run([*cli, "sample", "--model", "models:/iet-agc@candidate", "--num", "4", "--grid", "grid.png"], repo, env)
    assert (repo / "grid.png").stat().st_size > 0
    (repo / "grid.png").unlink()


def _logged(repo, expected_parents: int, taus: set[str]) -> None:
    """The MLflow store: one parent run per pipeline execution, every model's and round's runs, and
    every round's averaged model a logged model of its model's run, its round's metrics linked."""
    rounds = _copy_rounds(repo)
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from mlflow import MlflowClient
    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    exp = client.get_experiment_by_name("iet-agc")
    runs = client.search_runs([exp.experiment_id], max_results=500)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == expected_parents
    for parent in parents:
        assert {"baseline.mem_ratio", "iet.mem_ratio", "baseline.fd", "iet.fd"} <= parent.data.metrics.keys()
    assert {p.data.params["agc.tau"] for p in parents} == taus
    names = {r.info.run_name for r in runs}
    assert {"baseline", "iet", "evaluate baseline", "evaluate iet", "round 0 proxy 1"} <= names
    # every round's averaged model is a logged model of its model's run, its round's metrics linked
    logged = [m for m in client.search_logged_models([exp.experiment_id]) if m.name.startswith("round ")]
    trained = {r.info.run_id for r in runs if r.info.run_name in ("baseline", "iet")}
    assert sorted(m.name for m in logged if m.source_run_id in trained) == \
        sorted(f"round {r}" for r in range(1, rounds + 1) for _ in range(len(trained))), [m.name for m in logged]
    assert all(str(m.status).endswith("READY") and {"moved", "round_seconds"} <= {x.key for x in m.metrics} for m in logged)


@pytest.fixture
def one_round(tmp_path):
    """The tiny copy with one round: every kind of stage once (the slow suite's runs hand rounds on)."""
    return project_copy(tmp_path / "repo", {**TINY, "iet": {**TINY["iet"], "rounds": 1}})


# Where results are logged is an input of no result: the stages that log read tracking.* undeclared,
# so that a new store or experiment name re-runs no training (dvc.yaml's header).
UNDECLARED = ("tracking.",)


def _read_only_declared(repo, reads: Path) -> None:
    """Every stage read only the params its dvc.yaml entry declares: DVC re-runs a stage when one of
    those changes, and only then, so a key read but not declared is a change DVC would not see (a
    stale result restored from its cache). tests/params_probe recorded what each stage read."""
    from dvc.dependency.param import ParamsDependency
    from dvc.repo import Repo

    declared = {}
    with Repo(str(repo)) as dvc_repo:
        for stage in dvc_repo.index.stages:
            words = shlex.split(stage.cmd)
            keys = [k for dep in stage.deps if isinstance(dep, ParamsDependency) for k in dep.params or [""]]
            declared[tuple(words[words.index("-m") + 1:])] = (stage.addressing, keys)  # [""]: the whole file
    recorded = [json.loads(f.read_text()) for f in reads.glob("*.json")]
    assert {declared[tuple(r["command"])][0] for r in recorded} == {name for name, _ in declared.values()}
    undeclared = {}
    for r in recorded:
        name, keys = declared[tuple(r["command"])]
        found = [key for key in r["read"] if not key.startswith(UNDECLARED)
                 and not any(d in ("", key) or key.startswith(d + ".") for d in keys)]
        if found:
            undeclared[name] = found
    assert not undeclared, f"stages read params their entries in dvc.yaml do not list: {undeclared}"


def test_repro_on_tiny_params_makes_every_output_and_reruns_only_what_a_change_reaches(one_round, tmp_path):
    repo, env = one_round
    reads = tmp_path / "params_read"
    reads.mkdir()
    probed = {**env, "PYTHONPATH": str(ROOT / "tests/params_probe"), "IET_AGC_PARAMS_READ": str(reads)}
    _repro_and_check(repo, probed)
    _read_only_declared(repo, reads)
    _stale_stages_follow_what_changed(repo, env)
    _logged(repo, expected_parents=1, taus={"0.5"})


@pytest.mark.slow
def test_a_tau_experiment_and_back_from_the_run_cache(project):
    repo, env = project
    rounds = TINY["iet"]["rounds"]
    _run(["dvc", "repro"], repo, env)
    _run(["git", "add", "-A"], repo, env)
    _run(["git", "commit", "-qm", "ran"], repo, env)
    log = _run(["dvc", "exp", "run", "-S", "agc.tau=0.8"], repo, env)
    assert _ran(log) == {"validate", *_rounds("iet", rounds), "evaluate@iet", "report", "register"}
    # back to a value trained before: every round stage comes back from DVC's run cache, none trains
    log = _run(["dvc", "exp", "run", "-S", "agc.tau=0.5"], repo, env)
    assert not _ran(log) & (_rounds("iet", rounds) | _rounds("baseline", rounds)), log
    shown = _run(["dvc", "exp", "show", "--csv"], repo, env)
    assert "mem_ratio" in shown and "0.8" in shown
    _logged(repo, expected_parents=3, taus={"0.5", "0.8"})  # the repro, the two experiments (the second's evaluation ran again)

    # a user back from an experiment in the workspace: the default run's files return, nothing trains
    first = {m: (repo / f"runs/eval/{m}/metrics.json").read_text() for m in ("baseline", "iet")}
    _run(["dvc", "exp", "run", "-S", "agc.tau=0.8"], repo, env)
    _run(["git", "checkout", "params.yaml"], repo, env)
    log = _run(["dvc", "repro"], repo, env)
    assert _ran(log) <= {"report", "register"}, log  # both cheap: the report renders, register logs
    assert first == {m: (repo / f"runs/eval/{m}/metrics.json").read_text() for m in first}
    assert "Data and pipelines are up to date" in _run(["dvc", "status"], repo, env)


@pytest.mark.slow
def test_two_queued_experiments_run_at_once_and_log_into_the_workspace_store(project):
    """`dvc queue start -j 2`: two experiments at once, each in its own copy under .dvc/tmp/exps,
    both logging into the workspace's MLflow store; then `iet-agc tradeoff` and `ablation` over them."""
    repo, env = project
    _run(["dvc", "repro"], repo, env)
    _run(["git", "add", "-A"], repo, env)
    _run(["git", "commit", "-qm", "ran"], repo, env)
    cli = [sys.executable, "-m", "commands.cli"]
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from mlflow import MlflowClient
    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    exp = client.get_experiment_by_name("iet-agc")
    for name, (settings, _) in QUEUED.items():
        _run(["dvc", "exp", "run", "--queue", "-n", name, *(a for s in settings for a in ("-S", s))], repo, env)
    try:
        _run(["dvc", "queue", "start", "-j", "2"], repo, env)
        _wait_for_queue(repo, env)
    finally:
        subprocess.run(["dvc", "queue", "stop", "--kill"], cwd=repo, env=env, capture_output=True)

    shown = list(csv.DictReader(io.StringIO(_run(["dvc", "exp", "show", "--csv"], repo, env))))
    mem_cols = [c for c in shown[0] if c.endswith("mem_ratio")]
    assert mem_cols, f"no mem_ratio column in dvc exp show: {list(shown[0])}"
    for name, (_, tau) in QUEUED.items():
        row = next((r for r in shown if r["Experiment"] == name), None)
        assert row is not None, f"{name} not in dvc exp show: {[r['Experiment'] for r in shown]}"
        assert float(row["agc.tau"]) == float(tau)
        for col in mem_cols:
            assert 0.0 <= float(row[col]) <= 1.0, (name, col, row[col])

    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 3, [p.info.run_name for p in parents]  # the repro and the two queued
    children = {}
    for r in runs:
        children.setdefault(r.data.tags.get("mlflow.parentRunId"), []).append(r)
    artifacts = repo / "mlartifacts"
    for name, (_, tau) in QUEUED.items():
        parent = next((p for p in parents if p.data.tags.get("dvc_exp_name") == name), None)
        assert parent is not None, f"no MLflow parent run tagged dvc_exp_name={name}"
        assert parent.info.run_name == name and parent.info.status == "FINISHED"
        assert parent.data.params["agc.tau"] == tau
        assert {"baseline.mem_ratio", "iet.mem_ratio", "baseline.fd", "iet.fd"} <= parent.data.metrics.keys()
        # only iet, its evaluation and the report ran; every nested run arrived
        nested_names = [r.info.run_name for r in children.get(parent.info.run_id, [])]
        assert nested_names.count("iet") == 1 and nested_names.count("evaluate iet") == 1, nested_names
        assert "baseline" not in nested_names  # cached, not re-run
        nested = {r.info.run_name: r for r in children[parent.info.run_id]}
        proxies = [r.info.run_name for r in children.get(nested["iet"].info.run_id, [])]
        assert len(set(proxies)) == len(proxies) == TINY["iet"]["shards"] * TINY["iet"]["rounds"], proxies
        assert all(re.fullmatch(r"round \d+ proxy \d+", n) for n in proxies), proxies
        assert all(r.info.status == "FINISHED" for r in [*nested.values(), *children[nested["iet"].info.run_id]])
        # figures beside the workspace's store, not in the deleted temporary copy
        assert parent.info.artifact_uri.startswith(artifacts.as_uri()), parent.info.artifact_uri
        # read on disk: client.list_artifacts also resolves the run's logged models through the
        # process-wide tracking URI, which other tests in this process may have pointed elsewhere
        local = Path(url2pathname(urlparse(parent.info.artifact_uri).path))
        for figure in ("baseline/samples.png", "iet/samples.png", "iet/copies.png"):
            assert (local / figure).stat().st_size > 0, figure
        if name == "augment":  # the new mitigation, named in its own report
            assert "| IET-augment |" in (local / "report.md").read_text()
    assert not list(repo.glob(".dvc/tmp/exps/**/mlflow.db"))

    # the tau sweep and the new mitigation as one memorization-vs-quality figure from MLflow
    table = _run([*cli, "tradeoff", "--out", "sweep.png"], repo, env)
    assert all(f"| {tau} |" in table for tau in ("0.5", "0.7")) and "| IET-augment |" in table, table
    assert (repo / "sweep.png").stat().st_size > 0
    assert re.search(r"^\| IET-augment \|", _run([*cli, "ablation"], repo, env), re.M)

    # `dvc plots show` renders every plot declared under plots: in dvc.yaml
    _run(["dvc", "plots", "show", "--out", "plots_html"], repo, env)
    html = (repo / "plots_html/index.html").read_text()
    plots = yaml.safe_load((repo / "dvc.yaml").read_text())["plots"]
    declared = [p if isinstance(p, str) else next(iter(p)) for p in plots]
    missing = [p for p in declared if p not in html]
    assert not missing, f"plots declared in dvc.yaml but not rendered: {missing}"
