"""MLflow bookkeeping of the stages: a failure leaves no run RUNNING, a dead server is said before
any work, and every training and evaluation run records its data and its machine's load."""
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from mlflow import MlflowClient

from pipeline.core.config import parse_params
from pipeline.core.data import ImageSet
from pipeline.track.tracking import PARENT_KEY, Tracker
from stages import aggregate, evaluate, finish, profile, register, report, train
from tiny import dvc_args, tiny

PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"
TINY = tiny(data={'train_size': 8, 'heldout_size': 4}, eval={'ddim_steps': 4}, train={'batch_size': 4, 'warmup_share': 0}, iet={'shards': 2, 'rounds': 1, 'local_epochs': 1})


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One SQLite store for the module: a new one costs seconds of schema migration."""
    root = tmp_path_factory.mktemp("store")
    return f"sqlite:///{root / 'mlflow.db'}"


def _project(root: Path, uri: str, experiment: str) -> Path:
    raw = yaml.safe_load(PARAMS.read_text())
    for group, values in {**TINY, "tracking": {"uri": uri, "experiment": experiment}}.items():
        raw[group].update(values)
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    g = np.random.default_rng(0)
    ImageSet(g.integers(0, 256, (8, 1, 8, 8), dtype=np.uint8), np.arange(8) % 2,
             np.arange(8)).save(root / "data/prepared/train.npz")
    return root


def _runs(uri, experiment):
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id])


def _stage(command, args):
    result = CliRunner().invoke(command, args)
    assert result.exit_code == 0, result.output
    return result


def _rounds_of(model):
    """Every stage of `model`'s one round and its finish, as `dvc repro` runs them."""
    return [(train.main, dvc_args(f"{model}_train", "1")), (aggregate.main, dvc_args("aggregate", f"{model}-1")),
            (profile.main, dvc_args(f"{model}_profile", "1")), (finish.main, dvc_args(f"{model}_finish"))]


def test_a_failed_stage_leaves_no_run_running_and_a_rerun_finishes_cleanly(store, tmp_path, monkeypatch):
    monkeypatch.chdir(_project(tmp_path, store, "fail"))
    result = CliRunner().invoke(finish.main, dvc_args("baseline_finish"))  # before its round trained
    assert result.exit_code == 1 and "round_1/train" in result.output and "Traceback" not in result.output
    runs = _runs(store, "fail")
    parent = next(r for r in runs if PARENT_KEY in r.data.tags)
    assert {r.info.status for r in runs} == {"FAILED"}, {r.info.run_name: r.info.status for r in runs}

    for i, (command, args) in enumerate(_rounds_of("baseline")):
        _stage(command, args)
        if i < 3:  # between the model's stages its run waits, RUNNING only while a stage runs
            assert {r.info.status for r in _runs(store, "fail") if r.info.run_name == "baseline"} >= {"SCHEDULED"}
    runs = _runs(store, "fail")
    again = [r for r in runs if PARENT_KEY in r.data.tags]
    assert [r.info.run_id for r in again] == [parent.info.run_id]  # the same execution, not a second parent
    assert again[0].info.status == "SCHEDULED"  # no stage runs now; evaluate reopens it, the report finishes it
    trained = sorted(r.info.status for r in runs if r.info.run_name == "baseline")
    assert trained == ["FAILED", "FINISHED"]  # the failed attempt stays marked, the rerun is complete
    # the round's averaged model: a logged model of the model's run, the round's metrics linked to it
    (finished,) = [r for r in runs if r.info.run_name == "baseline" and r.info.status == "FINISHED"]
    client = MlflowClient(store)
    (logged,) = [m for m in client.search_logged_models([finished.info.experiment_id])
                 if m.source_run_id == finished.info.run_id]
    assert logged.name == "round 1" and str(logged.status) == "READY"
    assert {"moved", "round_seconds"} <= {m.key for m in logged.metrics}
    assert [o.model_id for o in client.get_run(finished.info.run_id).outputs.model_outputs] == [logged.model_id]


def test_a_killed_attempts_run_is_marked_killed_when_the_stage_runs_again(store, tmp_path):
    """SIGKILL leaves the attempt's run RUNNING (nothing in the process can close it); the next
    attempt of the same stage under the same parent closes it as KILLED."""
    p = parse_params({**TINY, "tracking": {"uri": store, "experiment": "killed"}})
    killed = Tracker(p).child("iet")  # never finished: the process died
    other = Tracker(p).child("baseline")  # another stage's run is left alone
    again = Tracker(p)
    rerun = again.child("iet")
    status = {r.info.run_id: r.info.status for r in _runs(store, "killed")}
    assert status[killed] == "KILLED" and status[other] == "RUNNING" and status[rerun] == "RUNNING"


def test_training_runs_record_their_data_and_system_metrics(store, tmp_path, monkeypatch):
    monkeypatch.chdir(_project(tmp_path, store, "provenance"))
    _stage(train.main, dvc_args("baseline_train", "1"))
    (run,) = [r for r in _runs(store, "provenance") if r.info.run_name == "baseline"]
    (used,) = run.inputs.dataset_inputs
    assert used.dataset.source_type == "local" and "train.npz" in used.dataset.source
    assert '"features_shape": [8, 1, 8, 8]' in used.dataset.profile
    assert {t.value for t in used.tags} == {"train"}
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= run.data.metrics.keys()


def test_runs_on_different_data_have_different_dataset_digests(store, tmp_path):
    p = parse_params({"tracking": {"uri": store, "experiment": "digests"}})
    tracker = Tracker(p)
    digests = []
    for seed in (0, 1):
        path = tmp_path / f"{seed}/train.npz"
        g = np.random.default_rng(seed)
        ImageSet(g.integers(0, 256, (4, 1, 8, 8), dtype=np.uint8), np.zeros(4, np.int64), np.arange(4)).save(path)
        run_id = tracker.child(f"data {seed}")
        tracker.log_data(run_id, {"train": path})
        tracker.finish(run_id)
        digests.append(tracker.client.get_run(run_id).inputs.dataset_inputs[0].dataset.digest)
    assert digests[0] != digests[1]


@pytest.mark.parametrize("command, args", [(train.main, dvc_args("baseline_train", "1")),
                                           (train.main, dvc_args("iet_train", "2")),
                                           (finish.main, dvc_args("iet_finish")),
                                           (evaluate.main, dvc_args("evaluate", "iet")),
                                           (report.main, dvc_args("report")), (register.main, dvc_args("register"))],
                         ids=["train", "train round 2", "finish", "evaluate", "report", "register"])
def test_every_tracked_stage_names_a_dead_server_before_any_work(tmp_path, monkeypatch, command, args):
    monkeypatch.chdir(_project(tmp_path, "http://127.0.0.1:9", "dead"))
    before = sorted(p for p in tmp_path.rglob("*"))
    result = CliRunner().invoke(command, args)
    assert result.exit_code == 1
    assert "MLflow tracking server http://127.0.0.1:9 cannot be reached" in result.output
    assert sorted(p for p in tmp_path.rglob("*")) == before  # nothing trained, sampled or written


def test_a_dp_sgd_run_logs_its_variant_and_epsilon(store, tmp_path, monkeypatch):
    root = _project(tmp_path, store, "dp")
    raw = yaml.safe_load((root / "params.yaml").read_text())
    raw["iet"]["shards"], raw["agc"]["enabled"], raw["dp"]["enabled"] = 1, False, True
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    (root / "runs/split").mkdir(parents=True)
    (root / "runs/split/shards.csv").write_text("sample_id,shard\n" + "".join(f"{i},0\n" for i in range(8)))
    monkeypatch.chdir(root)
    for command, args in _rounds_of("iet"):
        _stage(command, args)
    (run,) = [r for r in _runs(store, "dp") if r.info.run_name == "iet"]
    assert run.info.status == "FINISHED"
    assert run.data.params["variant"] == "DP-SGD (sigma=1.0)"
    assert 0 < run.data.metrics["dp_epsilon"] < float("inf")


def test_two_processes_opening_a_new_store_at_once_both_succeed(tmp_path):
    """`dvc queue start -j 2` on a fresh store: both experiments' first stage create the SQLite
    tables at the same moment (it failed with `table runs already exists`)."""
    import subprocess
    import sys

    script = ("import sys; from pipeline.core.config import parse_params; from pipeline.track.tracking import Tracker; "
              "Tracker(parse_params({'tracking': {'uri': sys.argv[1], 'experiment': 'race'}})); print('ok')")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    procs = [subprocess.Popen([sys.executable, "-c", script, uri], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]


def test_a_store_given_by_the_environment_keeps_artifacts_beside_it(tmp_path, monkeypatch):
    """MLFLOW_TRACKING_URI pointing at a SQLite file: a stage run from a queued DVC experiment's
    temporary copy must not put the experiment's artifacts (curves, figures) under that copy,
    which DVC deletes (MLflow's default is ./mlruns of the working directory)."""
    store = tmp_path / "shared/mlflow.db"
    store.parent.mkdir()
    copy = tmp_path / "repo/.dvc/tmp/exps/tmpcopy"
    copy.mkdir(parents=True)
    monkeypatch.chdir(copy)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store}")
    tracker = Tracker(parse_params({"tracking": {"experiment": "env"}}))
    location = tracker.client.get_experiment(tracker.experiment_id).artifact_location
    assert location == (store.parent / "mlartifacts").as_uri()
