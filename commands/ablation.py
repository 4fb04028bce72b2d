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
memorization at matched quality is compared here with the baseline's of the same setting, seed by
seed (each evaluation's curve.npz artifact; pipeline/compare/verdict.py): the difference of the per-seed
means with its Welch interval, an exact permutation p over seed labels and a verdict in words. One
comparison per setting (a regime) is primary, named before any run: IET-AGC+ as published against
the baseline; the primaries' p are Holm-adjusted over the settings, every other comparison's are
Benjamini-Hochberg q over all of them, and those are labelled exploratory. Each variant's other
means are marked where they differ from the baseline's by more than the seed spread explains
(SIGNIFICANCE).
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
from pipeline.core import figures
from pipeline.compare import verdict
from pipeline.compare.comparison import NOT_COMPUTED, frontier_lines, frontier_numbers, frontier_verdict, read_comparison
from pipeline.evaluate.metric_names import ABLATION, BY_KEY, shown_in
from pipeline.mitigation.dp import EPSILON

METRICS = shown_in(ABLATION)
# A setting is every param but these: the seed (averaged over), the switches and shown settings that
# make the variant (a sampling-time remedy's whole group: its knobs are in its name), tau and the
# shard count (shown as their own columns), and where results are logged or how processes are started.
NOT_SETTING = ("seeds.train", "agc.tau", "iet.shards", "train.launcher",
               *(f"{name}.enabled" for name in mitigation.REGISTRY),
               *mitigation.sampling_keys(),
               *mitigation.shown_keys())
# from the training run, beside the evaluation's metrics (runs from before per-round times were
# named round_train_seconds logged train_seconds by round too: training_metrics takes the last)
TRAINING_METRICS = ("train_seconds", EPSILON)
# "differs from the baseline beyond the seed spread": Welch's t-test over seeds (a one-sample test
# against 0 for the matched-quality metrics, already differences from the baseline) at this level
SIGNIFICANCE = 0.05
MARK = "*"
# The one confirmatory comparison per setting, named before the runs: the method as published
PRIMARY_VARIANT = "IET-AGC+"
PRIMARY, EXPLORATORY = "primary", "exploratory"


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


def compare_frontiers(rows: list[dict], margin: float = verdict.EQUIVALENCE_MARGIN) -> None:
    """Each variant's runs against the baseline's of its setting, seed by seed
    (comparison.frontier_numbers), where every seed of both has a curve; into row["frontier"], with
    the comparison's role and its multiplicity-adjusted p (`adjust`)."""
    baselines = {repr(r["setting"]): r for r in rows if r["variant"] == "baseline"}
    for row in rows:
        base = baselines.get(repr(row["setting"]))
        curves = [row["curves"], base["curves"] if base else []]
        if row["variant"] == "baseline" or not all(curves) or None in curves[0] + curves[1]:
            continue
        row["frontier"] = frontier_numbers({row["variant"]: curves[0]}, curves[1], margin)[row["variant"]]
    adjust(rows)


def adjust(rows: list[dict]) -> None:
    """The family's p-values: Holm over the settings' primary comparisons (PRIMARY_VARIANT against
    the baseline, memorization at matched KID), Benjamini-Hochberg over every other one; into
    row["role"] and row["frontier"]["mem_matched_p_adjusted"]. NaN p (not comparable) stays out."""
    compared = [r for r in rows if r["frontier"] and math.isfinite(r["frontier"].get("mem_matched_p", math.nan))]
    for role, method in ((PRIMARY, verdict.holm), (EXPLORATORY, verdict.benjamini_hochberg)):
        family = [r for r in compared if (r["variant"] == PRIMARY_VARIANT) == (role == PRIMARY)]
        for r, p in zip(family, method([r["frontier"]["mem_matched_p"] for r in family])):
            r["role"], r["frontier"]["mem_matched_p_adjusted"] = role, p


def null_check(rows: list[dict], size: int | None = None, margin: float = verdict.EQUIVALENCE_MARGIN) -> list[dict]:
    """The protocol on a null of known truth: the baseline's seeds split in two, every split the
    seeds allow (`size` seeds as the "model", default half, the others as the baseline; each
    partition once), each compared as a variant is (frontier_numbers). A split called better or
    worse is a false verdict."""
    out = []
    for row in rows:
        curves = dict(zip(row["curve_seeds"], row["curves"])) if row["variant"] == "baseline" else {}
        seeds = sorted((s for s, c in curves.items() if c is not None), key=lambda s: (len(s), s))
        for model, baseline in _splits(seeds, size or len(seeds) // 2):
            numbers = frontier_numbers({"null": [curves[s] for s in model]}, [curves[s] for s in baseline], margin)["null"]
            out.append({"setting": row["setting"], "model": ",".join(model), "baseline": ",".join(baseline),
                        **numbers, "verdict": frontier_verdict(numbers), "verdict_fd": frontier_verdict(numbers, "_fd")})
    return out


def _splits(seeds: list[str], size: int) -> list[tuple[tuple[str, ...], tuple[str, ...]]]:
    """Every split of the seeds into `size` and the rest, each partition once (with equal halves,
    only the half holding the first seed plays the model: the mirror split gives the mirror result)."""
    if size < 1 or len(seeds) - size < 1:
        return []
    return [(model, tuple(s for s in seeds if s not in model)) for model in itertools.combinations(seeds, size)
            if 2 * size != len(seeds) or seeds[0] in model]


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
    """null_check's splits, and how often each measure gave a false verdict, with the rate's
    Clopper-Pearson 95% interval (the splits share seeds, so they are not independent trials: the
    interval is a guide, not a test)."""
    if not pairs:
        return ""
    spec = BY_KEY["mem_matched"]
    lines = ["", "The null: the baseline's seeds split in two, each half compared as a variant (should be no "
             "better/worse)", "",
             "| seeds | against seeds | memorization at matched KID [95%] | p | verdict | under FD |", "|---|---|---|---|---|---|"]
    for q in pairs:
        lines.append(f"| {q['model']} | {q['baseline']} | {spec.format(q['mem_matched'])} [{spec.format(q['mem_matched_low'])}, "
                     f"{spec.format(q['mem_matched_high'])}] | {q['mem_matched_p']:.3f} | {q['verdict']} | {q['verdict_fd']} |")
    for key, label in (("verdict", "KID"), ("verdict_fd", "FD-infinity")):
        if all(q[key] == NOT_COMPUTED for q in pairs):
            continue
        false = sum(q[key] in (verdict.BETTER, verdict.WORSE, verdict.BELOW_FLOOR_BOUND) for q in pairs)
        low, high = scipy.stats.binomtest(false, len(pairs)).proportion_ci(0.95)
        lines.append(f"{'' if key == 'verdict_fd' else chr(10)}false verdicts under {label}: {false} of {len(pairs)} "
                     f"splits ({false / len(pairs):.0%}, 95% interval {low:.0%}-{high:.0%})")
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
    if metric.vs_baseline:  # a comparison with the baseline: estimate [95% interval] verdict
        return _comparison_cell(row, metric)
    if metric.key not in row["stats"]:
        return "-"
    mean, sd, n, vals = row["stats"][metric.key]
    text = metric.format(mean) + ("" if math.isnan(sd) else f" ± {metric.format(sd).lstrip('+')}")
    if row["variant"] != "baseline" and baseline is not None and metric.key in baseline["stats"] \
            and differs(vals, baseline["stats"][metric.key][3]):
        return text + MARK
    return text


def _comparison_cell(row: dict, metric) -> str:
    """estimate [Welch 95%] verdict (p, adjusted p), the primary marked; a side at the floor shows
    its bound; one seed a side shows no interval."""
    f = row["frontier"]
    if row["variant"] == "baseline" or metric.key not in f:
        return "-"  # the reference itself, or no curve to compare
    suffix = {"mem_matched": "", "mem_matched_fd": "_fd"}.get(metric.key)
    if suffix is None:
        return metric.format(f[metric.key])
    c = read_comparison(f, suffix)
    adjusted = f.get("mem_matched_p_adjusted") if not suffix else None
    words = verdict.word(c, adjusted)
    if c.reason is not None:
        return words
    text = f"{metric.format(c.estimate)} [{metric.format(c.low)}, {metric.format(c.high)}] {words}"
    if math.isfinite(c.model_bound):
        text += f", model <= {c.model_bound:.3f}"
    if math.isfinite(c.p):
        text += f" (p {c.p:.3f}" + ("" if adjusted is None else
                                    f", {'Holm' if row.get('role') == PRIMARY else 'BH q'} {adjusted:.3f}") + ")"
    if not suffix:
        text += f" {row.get('role', EXPLORATORY)}" + ("" if c.confirmatory else ", too few seeds")
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
              f"(Welch's t-test over seeds, p < {SIGNIFICANCE:g}). Columns against the baseline: memorization "
              "at matched quality, model - baseline, from per-seed scores: estimate [Welch 95% interval] verdict "
              f"(exact permutation p over seeds; Holm over the settings for the primary comparison, {PRIMARY_VARIANT} "
              "against the baseline; Benjamini-Hochberg q for the exploratory others). 'too few seeds': fewer than "
              f"{verdict.seeds_for_power(verdict.POWER_EFFECT_SD)} a side (80% power at {verdict.POWER_EFFECT_SD:g} "
              "seed-sd) or a least reachable p above 0.05 (pipeline/compare/verdict.py)"]
    return "\n".join(lines)
