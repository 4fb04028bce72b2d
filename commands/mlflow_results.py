"""The pipeline's results as an MLflow experiment holds them, read one way for the tradeoff figure
and the ablation table: one result per trained model of every pipeline execution, with its final
metrics, and on demand its curve over training and its training run's metrics.

Each execution (a `dvc repro` or a `dvc exp run`) is a top-level run whose params are the whole
params.yaml. Nested under it: the `evaluate <model>` run of each model it evaluated (the final
metrics, and the curve one MLflow step per checkpoint) and the training run named after the model;
the report logs each model's final metrics on the execution's run (metric_names.parent_metric).

A model that DVC kept cached (restored for another experiment, not trained nor evaluated again) has
no evaluation under that execution although its report names it. It is the model listed earlier
with the same final metrics, so it is listed only where there is none: once, not once per
experiment.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a bar per curve.npz would bury the table

from mlflow import MlflowClient  # noqa: E402
from mlflow.entities import Run  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402

from pipeline import mitigation  # noqa: E402
from pipeline.evaluate.frontier import Curve  # noqa: E402
from pipeline.evaluate.metric_names import CURVE_COLUMNS, curve_metric, evaluation_run, of_model  # noqa: E402

MODELS = ("baseline", "iet")  # the models an execution trains, in the order results list them
HEADLINE = "mem_ratio"        # every evaluation logs it: without it a model was not evaluated
SAME_MODEL = ("mem_ratio", "fd", "fid")  # final metrics equal on these: the same model
CURVE_NAMES = frozenset(curve_metric(c) for c in CURVE_COLUMNS)  # per checkpoint, not final
CURVE_FILE = "curve.npz"  # the evaluation's artifact the frontier comparison reads
_PARENT = "mlflow.parentRunId"
_PAGE = 10000  # runs per search request


@dataclass(frozen=True)
class ModelResult:
    run_id: str                # the execution's run
    run_name: str
    start_time: int
    params: dict[str, str]     # the execution's params.yaml, as logged (strings)
    model: str                 # baseline | iet
    variant: str               # mitigation.variant_name
    tau: float | None          # agc.tau when AGC is on
    metrics: dict[str, float]  # final: the report's and the evaluation's
    evaluation_id: str | None  # its finished evaluate run; None when DVC restored the model
    training_id: str | None    # its training run under this execution


def variant(params: dict[str, str], model: str) -> tuple[str, float | None]:
    """The method an execution's `model` was trained with, from its logged params (strings), and
    agc.tau when AGC was on (tau is the method's main knob, so figures and tables show it)."""
    name = mitigation.logged_variant(params, model)
    on = model != "baseline" and "agc" in mitigation.active(mitigation.enabled_in_logged(params),
                                                             int(params.get("iet.shards", 2)))
    return name, float(params["agc.tau"]) if on and "agc.tau" in params else None


def read_results(client: MlflowClient, experiment: str) -> list[ModelResult]:
    """Every model of every execution of `experiment`, oldest execution first, the baseline before
    the IET model; a model DVC restored from its cache only where no earlier one has its metrics."""
    runs = _all_runs(client, experiment)
    evaluations = _latest_child(runs, evaluation_run, finished=True)
    trainings = _latest_child(runs, lambda model: model)  # a training run is named after its model
    results, seen = [], set()
    for parent in (r for r in runs if _PARENT not in r.data.tags):
        for model in MODELS:
            key = (parent.info.run_id, model)
            result = _result(parent, model, evaluations.get(key), trainings.get(key))
            if result is None:
                continue
            identity = (model, *(result.metrics.get(k) for k in SAME_MODEL))
            if result.evaluation_id is None and identity in seen:
                continue
            seen.add(identity)
            results.append(result)
    return results


def curve(client: MlflowClient, result: ModelResult, columns: tuple[str, ...]) -> list[dict[str, float]]:
    """The model's curve over training: per checkpoint in training order (the MLflow step), the
    rounds.csv `columns` (metric_names.CURVE_COLUMNS), for the checkpoints that have all of them;
    none when its evaluation is not under this execution."""
    if result.evaluation_id is None:
        return []
    by_column = {c: {m.step: m.value for m in client.get_metric_history(result.evaluation_id, curve_metric(c))}
                 for c in columns}
    steps = sorted(set.intersection(*(set(v) for v in by_column.values())))
    return [{c: by_column[c][s] for c in columns} for s in steps]


def frontier_curve(client: MlflowClient, result: ModelResult) -> Curve | None:
    """The model's curve.npz (every checkpoint's memorized flags and features: pipeline/evaluate/frontier.py),
    from its evaluation's artifacts; None when it has none (restored by DVC, evaluated before curves
    were kept, or with eval.curve_samples 0)."""
    if result.evaluation_id is None or CURVE_FILE not in {a.path for a in client.list_artifacts(result.evaluation_id)}:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = client.download_artifacts(result.evaluation_id, CURVE_FILE, tmp)
        except (MlflowException, OSError):
            return None
        curve = Curve.load(path)
    return curve if len(curve.progress) else None


def training_metrics(client: MlflowClient, result: ModelResult, keys: tuple[str, ...]) -> dict[str, float]:
    """`keys` of the model's training run, each the last value logged (the round loop logs some of
    them per round, the run's total at its end)."""
    if result.training_id is None:
        return {}
    histories = {key: client.get_metric_history(result.training_id, key) for key in keys}
    return {key: max(h, key=lambda m: m.timestamp).value for key, h in histories.items() if h}


def _all_runs(client: MlflowClient, experiment: str) -> list[Run]:
    """Every run of the experiment, oldest first; none when it does not exist."""
    exp = client.get_experiment_by_name(experiment)
    runs, token = [], None
    while exp is not None:
        page = client.search_runs([exp.experiment_id], max_results=_PAGE, page_token=token,
                                  order_by=["attributes.start_time ASC"])
        runs += page
        token = page.token
        if not token:
            break
    return runs


def _latest_child(runs: list[Run], run_name, finished: bool = False) -> dict[tuple[str, str], Run]:
    """(execution's run id, model) -> its latest nested run named run_name(model) (FINISHED ones
    only when `finished`): a stage that ran again under the same execution replaces what it logged."""
    names = {run_name(model): model for model in MODELS}
    found = {}
    for r in runs:  # oldest first: a later run overwrites
        if r.info.run_name in names and _PARENT in r.data.tags and (not finished or r.info.status == "FINISHED"):
            found[(r.data.tags[_PARENT], names[r.info.run_name])] = r
    return found


def _result(parent: Run, model: str, evaluation: Run | None, training: Run | None) -> ModelResult | None:
    """`model` of the execution `parent`, or None when neither its report nor an evaluation has its
    final metrics."""
    final = of_model(parent.data.metrics, model)
    if evaluation is not None:
        final.update({k: v for k, v in evaluation.data.metrics.items() if k not in CURVE_NAMES})
    if HEADLINE not in final:
        return None
    name, tau = variant(parent.data.params, model)
    return ModelResult(parent.info.run_id, parent.info.run_name or parent.info.run_id[:8], parent.info.start_time,
                       dict(parent.data.params), model, name, tau, final,
                       evaluation.info.run_id if evaluation else None, training.info.run_id if training else None)
