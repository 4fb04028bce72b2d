"""The ablation table: every variant's metrics over seeds, read back from MLflow.

Each pipeline run or DVC experiment has a parent run holding the whole params.yaml; its nested
`evaluate <model>` runs hold the metrics and its `baseline` / `iet` runs the training time
(commands/mlflow_results.py reads them; a baseline that DVC restored from its cache for another
experiment is counted once, where it was trained). Runs are grouped by model variant, tau,
shard count K and setting (every other param but `seeds.train`), and each group's metrics are given
as mean and standard deviation over its seeds; the params in which groups differ are shown as
columns.

A variant may be trained without its own baseline (`dvc exp run ... evaluate@iet`, as the
single-model variants are: their `iet.shards=1` would otherwise re-train the baseline): its
memorization at matched quality is then read here, as the report stage reads it, against the
curve of the baseline of the same setting and seed. Each variant's mean is marked where it differs
from the baseline's by more than the seed spread explains (SIGNIFICANCE).
"""
from __future__ import annotations

import math
from collections import defaultdict

import numpy as np
import scipy.stats
from mlflow import MlflowClient

from commands.mlflow_results import ModelResult, curve, read_results, training_metrics
from pipeline import mitigation
from pipeline.comparison import MATCHING_COLUMNS, at_matched_quality
from pipeline.metric_names import ABLATION, BY_KEY, shown_in
from pipeline.mitigation.dp import EPSILON

METRICS = shown_in(ABLATION)
# A setting is every param but these: the seed (averaged over), the switches and shown settings that
# make the variant, tau and the shard count (shown as their own columns), and where results are
# logged or how processes are started.
NOT_SETTING = ("seeds.train", "agc.tau", "iet.shards", "train.launcher",
               *(f"{name}.enabled" for name in mitigation.REGISTRY),
               *mitigation.shown_keys())
# from the training run, beside the evaluation's metrics (runs from before per-round times were
# named round_train_seconds logged train_seconds by round too: training_metrics takes the last)
TRAINING_METRICS = ("train_seconds", EPSILON)
# "differs from the baseline beyond the seed spread": Welch's t-test over seeds (a one-sample test
# against 0 for the matched-quality metrics, already differences from the baseline) at this level
SIGNIFICANCE = 0.05
MARK = "*"


def _setting(params: dict[str, str]) -> tuple:
    return tuple(sorted((k, v) for k, v in params.items()
                        if k not in NOT_SETTING and not k.startswith("tracking.")))


def collect(client: MlflowClient, experiment: str) -> list[dict]:
    """One record per model in the experiment (mlflow_results.read_results): variant, tau, K,
    setting, seed, metrics (its training run's too) and its curve."""
    records = [_record(client, result) for result in read_results(client, experiment)]
    _match_quality(records)
    return records


def _record(client: MlflowClient, result: ModelResult) -> dict:
    params = result.params
    return {"model": result.model, "variant": result.variant, "tau": result.tau, "seed": params.get("seeds.train"),
            "shards": 1 if result.model == "baseline" else int(params.get("iet.shards", 2)),
            "setting": _setting(params), "run": result.run_name,
            "metrics": {**result.metrics, **training_metrics(client, result, TRAINING_METRICS)},
            "curve": curve(client, result, MATCHING_COLUMNS)}


def _match_quality(records: list[dict]) -> None:
    """Memorization at matched quality of every non-baseline record against the curve of the
    baseline of its setting and seed (the first one trained), as the report stage computes it; a
    record without such a baseline keeps what its report logged, if anything."""
    baselines: dict[tuple, dict] = {}
    for rec in records:
        if rec["model"] == "baseline":
            baselines.setdefault((rec["setting"], rec["seed"]), rec)
    for rec in records:
        base = baselines.get((rec["setting"], rec["seed"]))
        if rec["model"] == "baseline" or base is None or not base["curve"] or not rec["curve"]:
            continue
        matched = at_matched_quality(base["curve"], rec["curve"])
        rec["metrics"].update({k: v for k, v in matched.items() if k in BY_KEY})  # not its status


def table(records: list[dict]) -> list[dict]:
    """Groups of records equal in variant, tau, K and setting: seeds, and per metric (mean, sd, n,
    values) over the seeds where it is finite. A seed counts once per group: a model trained again
    with the same seed and setting (an experiment queued without a target re-trains the baseline)
    is the same model, so the first record of it stands."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for rec in records:
        group = groups[(rec["setting"], rec["variant"], rec["tau"], rec["shards"])]
        if all(other["seed"] != rec["seed"] for other in group):
            group.append(rec)
    rows = []
    for (setting, label, tau, shards), recs in groups.items():
        stats = {}
        for key in (m.key for m in METRICS):
            vals = [v for rec in recs if math.isfinite(v := rec["metrics"].get(key, math.nan))]
            if vals:
                stats[key] = (float(np.mean(vals)), float(np.std(vals, ddof=1)) if len(vals) > 1 else math.nan,
                              len(vals), vals)
        rows.append({"variant": label, "tau": tau, "shards": shards, "setting": dict(setting),
                     "runs": [r["run"] for r in recs], "seeds": sorted({str(r["seed"]) for r in recs}),
                     "stats": stats})
    rows.sort(key=lambda r: (repr(list(r["setting"].values())), mitigation.variant_sort_key(r["variant"]),
                             r["tau"] or 0, r["shards"]))
    return rows


def differs(values: list[float], reference: list[float] | None) -> bool:
    """Whether the mean of `values` differs from the mean of `reference` (or from 0 when None) by
    more than their spread over seeds explains: Welch's t-test, p < SIGNIFICANCE. With no spread
    at all (every seed the same value on both sides) any difference counts; with one value on a side
    and no spread known, nothing can be said."""
    a = np.asarray(values, np.float64)
    b = np.zeros(1) if reference is None else np.asarray(reference, np.float64)
    diff = a.mean() - b.mean()
    var_a = a.var(ddof=1) / len(a) if len(a) > 1 else math.nan
    var_b = 0.0 if reference is None else (b.var(ddof=1) / len(b) if len(b) > 1 else math.nan)
    se2 = var_a + var_b
    if not math.isfinite(se2):
        return False
    if se2 == 0:
        return bool(diff != 0)
    # Welch-Satterthwaite degrees of freedom
    dof = se2 ** 2 / (var_a ** 2 / (len(a) - 1) + (var_b ** 2 / (len(b) - 1) if var_b else 0.0))
    return bool(2 * scipy.stats.t.sf(abs(diff) / math.sqrt(se2), dof) < SIGNIFICANCE)


def _cell(row: dict, metric, baseline: dict | None) -> str:
    if metric.key not in row["stats"] or (row["variant"] == "baseline" and metric.vs_baseline):
        return "-"  # the baseline against its own curve is the reference, not a result
    mean, sd, n, vals = row["stats"][metric.key]
    text = metric.format(mean) + ("" if math.isnan(sd) else f" ± {metric.format(sd).lstrip('+')}")
    if row["variant"] == "baseline":
        return text
    if metric.vs_baseline:
        return text + (MARK if differs(vals, None) else "")
    if baseline is not None and metric.key in baseline["stats"] and differs(vals, baseline["stats"][metric.key][3]):
        return text + MARK
    return text


def markdown(rows: list[dict]) -> str:
    """mean ± sd per cell, MARK where a variant differs from its setting's baseline beyond the seed
    spread (differs); settings that differ between rows are shown as a column."""
    keys = sorted({k for r in rows for k in r["setting"]})
    varying = [k for k in keys if len({str(r["setting"].get(k)) for r in rows}) > 1]
    baselines = {repr(r["setting"]): r for r in rows if r["variant"] == "baseline"}
    head = ["variant", "K", "tau", *varying, "seeds", *[m.label for m in METRICS]]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for r in rows:
        cells = [r["variant"], str(r["shards"]), "-" if r["tau"] is None else f"{r['tau']:g}",
                 *[str(r["setting"].get(k)) for k in varying], ",".join(r["seeds"])]
        cells += [_cell(r, m, baselines.get(repr(r["setting"]))) for m in METRICS]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"mean ± sd over seeds; {MARK}: differs from the baseline of its setting beyond the seed spread "
              f"(Welch's t-test over seeds, p < {SIGNIFICANCE:g}; matched-quality columns: against 0)"]
    return "\n".join(lines)
