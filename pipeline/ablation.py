"""The ablation table: every variant's metrics over seeds, read back from MLflow.

Each pipeline run or DVC experiment has a parent run holding the whole params.yaml; its nested
`evaluate <model>` runs hold the metrics and its `baseline` / `iet` runs the training time. Only
stages that actually ran have nested runs, so a baseline that DVC restored from its cache for
another experiment is counted once, where it was trained. Runs are grouped by model variant, tau and
setting (every other param but `seeds.train`), and each group's metrics are given as mean and
standard deviation over its seeds; the params in which groups differ are shown as columns.
"""
from __future__ import annotations

import math
from collections import defaultdict

import numpy as np
from mlflow import MlflowClient

from pipeline import mitigation
from pipeline.metric_names import ABLATION, shown_in
from pipeline.tradeoff import variant

METRICS = shown_in(ABLATION)
# A setting is every param but these: the seed (averaged over), the switches that make the variant
# and tau (shown as their own columns), and where results are logged or how processes are started.
NOT_SETTING = ("seeds.train", *(f"{name}.enabled" for name in mitigation.REGISTRY), "agc.tau", "train.launcher")


def _setting(params: dict[str, str]) -> tuple:
    return tuple(sorted((k, v) for k, v in params.items()
                        if k not in NOT_SETTING and not k.startswith("tracking.")))


def collect(client: MlflowClient, experiment: str) -> list[dict]:
    """One record per evaluated model: variant, tau, setting, seed and metrics."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    runs = client.search_runs([exp.experiment_id], max_results=50000, order_by=["attributes.start_time ASC"])
    by_id = {r.info.run_id: r for r in runs}
    trained: dict[tuple[str, str], float] = {}
    for r in runs:
        if r.info.run_name in ("baseline", "iet") and "train_seconds" in r.data.metrics:
            # The last logged: runs before per-round times were named round_train_seconds logged them
            # as train_seconds too, by round, before the whole run's.
            last = max(client.get_metric_history(r.info.run_id, "train_seconds"), key=lambda m: m.timestamp)
            trained[(r.data.tags.get("mlflow.parentRunId"), r.info.run_name)] = last.value
    records = []
    for r in runs:
        name = r.info.run_name or ""
        parent = by_id.get(r.data.tags.get("mlflow.parentRunId", ""))
        if not name.startswith("evaluate ") or parent is None or r.info.status != "FINISHED":
            continue
        model, params = name.split(" ", 1)[1], parent.data.params
        label, tau = variant(params, model)
        # what the report derived from both models (matched quality) is logged on the parent
        m = {**{k.split(".", 1)[1]: v for k, v in parent.data.metrics.items() if k.startswith(model + ".")},
             **r.data.metrics}
        if (parent.info.run_id, model) in trained:
            m["train_seconds"] = trained[(parent.info.run_id, model)]
        records.append({"model": model, "variant": label, "tau": tau, "seed": params.get("seeds.train"),
                        "setting": _setting(params), "run": parent.info.run_name,
                        "metrics": m})
    return records


def table(records: list[dict]) -> list[dict]:
    """Groups of records equal in variant, tau and setting: seeds, and per metric (mean, sd, n).
    A seed counts once per group: a model trained again with the same seed and setting (an
    experiment queued without a target re-trains the baseline) is the same model, so the first
    record of it stands."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for rec in records:
        group = groups[(rec["setting"], rec["variant"], rec["tau"])]
        if all(other["seed"] != rec["seed"] for other in group):
            group.append(rec)
    rows = []
    for (setting, label, tau), recs in groups.items():
        stats = {}
        for key in (m.key for m in METRICS):
            vals = [rec["metrics"][key] for rec in recs if key in rec["metrics"]]
            if vals:
                stats[key] = (float(np.mean(vals)), float(np.std(vals, ddof=1)) if len(vals) > 1 else math.nan,
                              len(vals))
        rows.append({"variant": label, "tau": tau, "setting": dict(setting), "runs": [r["run"] for r in recs],
                     "seeds": sorted({str(r["seed"]) for r in recs}), "stats": stats})
    rows.sort(key=lambda r: (repr(list(r["setting"].values())), mitigation.variant_sort_key(r["variant"]),
                             r["tau"] or 0))
    return rows


def markdown(rows: list[dict]) -> str:
    """mean ± sd (n runs) per cell; settings that differ between rows are shown as a column."""
    keys = sorted({k for r in rows for k in r["setting"]})
    varying = [k for k in keys if len({str(r["setting"].get(k)) for r in rows}) > 1]
    head = ["variant", "tau", *varying, "seeds", *[m.label for m in METRICS]]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for r in rows:
        cells = [r["variant"], "-" if r["tau"] is None else f"{r['tau']:g}",
                 *[str(r["setting"].get(k)) for k in varying], ",".join(r["seeds"])]
        for m in METRICS:
            if m.key not in r["stats"]:
                cells.append("-")
                continue
            mean, sd, n = r["stats"][m.key]
            cells.append(m.format(mean) + ("" if math.isnan(sd) else f" ± {m.format(sd)}"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
