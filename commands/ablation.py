"""The ablation table: every variant's metrics over seeds, read back from MLflow.

Each pipeline run or DVC experiment has a parent run holding the whole params.yaml; its nested
`evaluate <model>` runs hold the metrics and its `baseline` / `iet` runs the training time
(commands/mlflow_results.py reads them; a baseline that DVC restored from its cache for another
experiment is counted once, where it was trained). Runs are grouped by model variant, tau,
shard count K and setting (every other param but `seeds.train`), and each group's metrics are given
as mean and standard deviation over its seeds; the params in which groups differ are shown as
columns.

A variant may be trained without its own baseline (`dvc exp run ... evaluate@iet`, as the
single-model variants are: their `iet.shards=1` would otherwise re-train the baseline). Its
memorization-quality frontier is compared here with the baseline's of the same setting, over all
seeds of both (each evaluation's curve.npz artifact; pipeline/frontier.py): memorization at matched
quality and the area between the frontiers, with 95% bootstrap intervals and a verdict. Each
variant's other means are marked where they differ from the baseline's by more than the seed
spread explains (SIGNIFICANCE).
"""
from __future__ import annotations

import itertools
import math
from collections import defaultdict
from pathlib import Path

import numpy as np
import scipy.stats
from mlflow import MlflowClient

from commands.mlflow_results import ModelResult, frontier_curve, read_results, training_metrics
from pipeline import mitigation
from pipeline import figures
from pipeline.comparison import frontier_lines, frontier_numbers, frontier_verdict
from pipeline.frontier import BETTER, WORSE
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
    setting, seed, metrics (its training run's too) and its curve.npz (None without one)."""
    return [_record(client, result) for result in read_results(client, experiment)]


def _record(client: MlflowClient, result: ModelResult) -> dict:
    params = result.params
    return {"model": result.model, "variant": result.variant, "tau": result.tau, "seed": params.get("seeds.train"),
            "shards": 1 if result.model == "baseline" else int(params.get("iet.shards", 2)),
            "setting": _setting(params), "run": result.run_name,
            "metrics": {**result.metrics, **training_metrics(client, result, TRAINING_METRICS)},
            "frontier": frontier_curve(client, result)}


def table(records: list[dict]) -> list[dict]:
    """`group`'s rows, each variant with its frontier comparison with the baseline of its setting
    (`compare_frontiers`)."""
    rows = group(records)
    compare_frontiers(rows)
    return rows


def group(records: list[dict]) -> list[dict]:
    """Groups of records equal in variant, tau, K and setting: seeds, and per metric (mean, sd, n,
    values) over the seeds where it is finite, and their curves. A seed counts once per group: a
    model trained again with the same seed and setting (an experiment queued without a target
    re-trains the baseline) is the same model, so the first record of it stands."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for rec in records:
        members = groups[(rec["setting"], rec["variant"], rec["tau"], rec["shards"])]
        if all(other["seed"] != rec["seed"] for other in members):
            members.append(rec)
    rows = []
    for (setting, label, tau, shards), recs in groups.items():
        stats = {}
        for key in (m.key for m in METRICS if not m.vs_baseline):
            vals = [v for rec in recs if math.isfinite(v := rec["metrics"].get(key, math.nan))]
            if vals:
                stats[key] = (float(np.mean(vals)), float(np.std(vals, ddof=1)) if len(vals) > 1 else math.nan,
                              len(vals), vals)
        rows.append({"variant": label, "tau": tau, "shards": shards, "setting": dict(setting),
                     "runs": [r["run"] for r in recs], "seeds": sorted({str(r["seed"]) for r in recs}),
                     "stats": stats, "curves": [r["frontier"] for r in recs],
                     "curve_seeds": [str(r["seed"]) for r in recs], "frontier": {}})
    rows.sort(key=lambda r: (repr(list(r["setting"].values())), mitigation.variant_sort_key(r["variant"]),
                             r["tau"] or 0, r["shards"]))
    return rows


def compare_frontiers(rows: list[dict]) -> None:
    """Each variant's frontier, over its seeds, against the baseline's of its setting over the
    baseline's seeds (comparison.frontier_numbers: a bootstrap over samples and seeds), where every
    seed of both has a curve; into row["frontier"]."""
    baselines = {repr(r["setting"]): r for r in rows if r["variant"] == "baseline"}
    for row in rows:
        base = baselines.get(repr(row["setting"]))
        curves = [row["curves"], base["curves"] if base else []]
        if row["variant"] == "baseline" or not all(curves) or None in curves[0] + curves[1]:
            continue
        row["frontier"] = frontier_numbers({row["variant"]: curves[0]}, curves[1])[row["variant"]]


def null_check(rows: list[dict], size: int | None = None) -> list[dict]:
    """The protocol on a null: each group of `size` baseline seeds compared, as a model, with each
    disjoint group of as many other seeds of the same setting as the baseline (frontier_numbers).
    Every pair should come out indistinguishable; one that says better or worse is a false verdict.
    `size` defaults to half the seeds with curves (1 with 2 or 3 seeds), so that the null resamples
    as many seeds a side as a variant compared with the baseline does."""
    out = []
    for row in rows:
        curves = dict(zip(row["curve_seeds"], row["curves"])) if row["variant"] == "baseline" else {}
        seeds = [s for s, c in curves.items() if c is not None]
        for model, baseline in _seed_groups(seeds, size or max(1, len(seeds) // 2)):
            numbers = frontier_numbers({"null": [curves[s] for s in model]}, [curves[s] for s in baseline])["null"]
            out.append({"setting": row["setting"], "model": ",".join(model), "baseline": ",".join(baseline),
                        **numbers, "verdict": frontier_verdict(numbers),
                        "verdict_fd": frontier_verdict(numbers, "mem_matched_fd")})
    return out


def _seed_groups(seeds: list[str], size: int) -> list[tuple[tuple[str, ...], tuple[str, ...]]]:
    """Ordered pairs of disjoint groups of `size` seeds each (permutations of the seeds for size 1)."""
    return [(model, baseline) for model in itertools.combinations(seeds, size)
            for baseline in itertools.combinations([s for s in seeds if s not in model], size)]


def save_frontier_figures(rows: list[dict], path: Path) -> list[Path]:
    """One figure per setting (a regime): every variant's frontier over its seeds, with its 95%
    bootstrap band and checkpoints (comparison.frontier_lines), at `path`, or `path` with the
    setting's number appended when there are several. Variants without curves are left out."""
    settings: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        if row["curves"] and None not in row["curves"]:
            settings[repr(row["setting"])].append(row)
    written = []
    for i, group in enumerate(settings.values(), start=1):
        target = path if len(settings) == 1 else path.with_name(f"{path.stem}-{i}{path.suffix}")
        floor = float(np.mean([c.floor for c in group[0]["curves"]]))  # held-out images' ratio: the same data
        figures.save_frontiers(frontier_lines({r["variant"]: r["curves"] for r in group}), target,
                               BY_KEY["kid"].axis_label + ", curve samples", BY_KEY["mem_ratio"].axis_label,
                               reference=floor)
        written.append(target)
    return written


def null_markdown(pairs: list[dict]) -> str:
    """null_check's pairs, and how often each measure gave a false verdict."""
    if not pairs:
        return ""
    spec = BY_KEY["mem_matched"]
    lines = ["", "The null: baseline seeds against other seeds of the baseline (should be indistinguishable)", "",
             "| seeds | against seeds | memorization at matched KID [95%] | verdict | under FD |", "|---|---|---|---|---|"]
    for q in pairs:
        lines.append(f"| {q['model']} | {q['baseline']} | {spec.format(q['mem_matched'])} [{spec.format(q['mem_matched_low'])}, "
                     f"{spec.format(q['mem_matched_high'])}] | {q['verdict']} | {q['verdict_fd']} |")
    false = {key: sum(q[key] in (BETTER, WORSE) for q in pairs) for key in ("verdict", "verdict_fd")}
    lines += ["", f"false verdicts: {false['verdict']} of {len(pairs)} ordered pairs under KID, "
              f"{false['verdict_fd']} under FD"]
    return "\n".join(lines)


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
    if metric.vs_baseline:  # a frontier comparison with the baseline: estimate [95% interval] verdict
        f = row["frontier"]
        if row["variant"] == "baseline" or metric.key not in f:
            return "-"  # the reference itself, or no curve to compare
        if not math.isfinite(f[metric.key]):
            return frontier_verdict(f, metric.key)  # no common quality at which either copies: no number
        return (f"{metric.format(f[metric.key])} [{metric.format(f[metric.key + '_low'])}, "
                f"{metric.format(f[metric.key + '_high'])}] {frontier_verdict(f, metric.key)}")
    if metric.key not in row["stats"]:
        return "-"
    mean, sd, n, vals = row["stats"][metric.key]
    text = metric.format(mean) + ("" if math.isnan(sd) else f" ± {metric.format(sd).lstrip('+')}")
    if row["variant"] != "baseline" and baseline is not None and metric.key in baseline["stats"] \
            and differs(vals, baseline["stats"][metric.key][3]):
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
              f"(Welch's t-test over seeds, p < {SIGNIFICANCE:g}). Columns against the baseline: the frontier "
              "comparison over all seeds of both, estimate [95% bootstrap interval] and its verdict "
              "(pipeline/frontier.py)"]
    return "\n".join(lines)
