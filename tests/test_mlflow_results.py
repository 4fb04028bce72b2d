"""commands/mlflow_results.py, the one reader of the MLflow store for `iet-agc tradeoff` and
`iet-agc ablation`: executions laid out as the pipeline lays them out (a top-level run with the
params and the report's `<model>.<key>` metrics; nested evaluate and training runs)."""
import os

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from mlflow import MlflowClient  # noqa: E402

from commands.mlflow_results import curve, read_results, training_metrics  # noqa: E402
from pipeline.evaluate.metric_names import CURVE_COLUMNS, curve_metric, evaluation_run, parent_metric  # noqa: E402

BASELINE = {"mem_ratio": 0.5, "fd": 2.0}


def _execution(client, exp_id, name, reported: dict, evaluated: dict, curves: dict | None = None):
    parent = client.create_run(exp_id, run_name=name).info.run_id
    client.log_param(parent, "seeds.train", "0")
    for model, metrics in reported.items():
        for key, value in metrics.items():
            client.log_metric(parent, parent_metric(model, key), value)
    for model, metrics in evaluated.items():
        nested = {"mlflow.parentRunId": parent}
        child = client.create_run(exp_id, run_name=evaluation_run(model), tags=nested).info.run_id
        for key, value in metrics.items():
            client.log_metric(child, key, value)
        for step, row in enumerate((curves or {}).get(model, []), start=1):
            for column, value in row.items():
                client.log_metric(child, curve_metric(column), value, step=step)
        client.set_terminated(child)
        training = client.create_run(exp_id, run_name=model, tags=nested).info.run_id
        client.log_metric(training, "train_seconds", 10.0, timestamp=1)
        client.log_metric(training, "train_seconds", 40.0, timestamp=2)
    client.set_terminated(parent)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("results")
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    exp = client.create_experiment("e", artifact_location=(root / "a").as_uri())
    row = {c: float(i) for i, c in enumerate(CURVE_COLUMNS)}
    _execution(client, exp, "first", {"baseline": {**BASELINE, "mem_at_matched_quality": 0.0}},
               {"baseline": BASELINE, "iet": {"mem_ratio": 0.1, "fd": 3.0}}, curves={"baseline": [row, row]})
    # another experiment: DVC restored the baseline (its report names it; no evaluation under it)
    _execution(client, exp, "restored", {"baseline": BASELINE, "iet": {"mem_ratio": 0.2, "fd": 4.0}},
               {"iet": {"mem_ratio": 0.2, "fd": 4.0}})
    # the same baseline trained and evaluated again: evaluated here, so listed here too
    _execution(client, exp, "again", {}, {"baseline": BASELINE})
    # a report whose evaluations are not in this store: listed once, from the report
    _execution(client, exp, "report only", {"baseline": {"mem_ratio": 0.7, "fd": 1.0}}, {})
    return client


def test_each_model_is_listed_where_it_was_evaluated_and_a_restored_one_only_once(store):
    results = read_results(store, "e")
    assert [(r.run_name, r.model, r.evaluation_id is not None) for r in results] == [
        ("first", "baseline", True), ("first", "iet", True), ("restored", "iet", True),
        ("again", "baseline", True), ("report only", "baseline", False)]
    first = results[0]
    assert first.metrics == {**BASELINE, "mem_at_matched_quality": 0.0}  # the report's and the evaluation's
    assert (first.variant, first.tau, first.params["seeds.train"]) == ("baseline", None, "0")


def test_curves_by_column_and_the_training_runs_last_values(store):
    first, iet, *_, report_only = read_results(store, "e")
    rows = curve(store, first, ("round", "fd"))
    assert rows == [{"round": 0.0, "fd": float(CURVE_COLUMNS.index("fd"))}] * 2
    assert curve(store, iet, CURVE_COLUMNS) == [] and curve(store, report_only, ("fd",)) == []
    assert training_metrics(store, first, ("train_seconds", "dp_epsilon")) == {"train_seconds": 40.0}
    assert training_metrics(store, report_only, ("train_seconds",)) == {}


def test_an_experiment_that_does_not_exist_has_no_results(store):
    assert read_results(store, "nothing") == []
