"""Memorization against quality for every run the MLflow experiment holds: one point per model.

Each pipeline execution (a `dvc repro` or a `dvc exp run`) has a parent run tagged with
tracking.PARENT_KEY, on which the report stage logs `baseline.<metric>` and `iet.<metric>` and whose
params are the whole params.yaml.  So experiments over agc.tau, or with MSR/TAA/AGC switched off,
appear here as points labelled by variant and tau, and the non-dominated ones (no other point both
memorizes less and has a lower distance) form the Pareto front.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter  # noqa: E402
from mlflow import MlflowClient  # noqa: E402

from pipeline import mitigation  # noqa: E402
from pipeline.figures import _save_figure  # noqa: E402
from pipeline.metric_names import BY_KEY  # noqa: E402
from pipeline.tracking import PARENT_KEY  # noqa: E402

MARKERS = "osD^vP*Xph<>"  # cycled: any number of variants


@dataclass(frozen=True)
class Point:
    run_id: str
    run_name: str
    model: str          # baseline | iet
    variant: str        # mitigation.variant_name
    tau: float | None   # agc.tau when AGC is on
    mem_ratio: float
    heldout_mem_ratio: float | None
    fd: float | None
    fid: float | None
    start_time: int
    curve: tuple[tuple[float, float], ...] = ()  # (FD, memorization ratio) of its checkpoints, in training order


def variant(params: dict[str, str], model: str) -> tuple[str, float | None]:
    """The method a parent run's `model` was trained with, from its logged params (strings), and
    agc.tau when AGC was on (tau is the method's main knob, so figures and tables show it)."""
    name = mitigation.logged_variant(params, model)
    on = model != "baseline" and "agc" in mitigation.active(mitigation.enabled_in_logged(params),
                                                             int(params.get("iet.shards", 2)))
    return name, float(params["agc.tau"]) if on and "agc.tau" in params else None


def collect(client: MlflowClient, experiment: str) -> list[Point]:
    """Both models of every parent run: from the metrics the report logged on it (`<model>.mem_ratio`),
    or, for an experiment that stopped at an evaluation (`dvc exp run ... evaluate@iet`), from that
    evaluation's run.

    A baseline that DVC kept cached across experiments is the same model each time: it is listed
    once (its first run), not once per experiment.
    """
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    runs = client.search_runs([exp.experiment_id], f"tags.`{PARENT_KEY}` != ''", max_results=5000,
                              order_by=["attributes.start_time ASC"])
    points, seen_baselines = [], set()
    evaluations = _evaluations(client, exp.experiment_id)
    for run in runs:
        for model in ("baseline", "iet"):
            evaluation = evaluations.get((run.info.run_id, model))
            m = _final_metrics(run, model, evaluation)
            if m is None:
                continue
            name, tau = variant(run.data.params, model)
            point = Point(run.info.run_id, run.info.run_name or run.info.run_id[:8], model, name, tau,
                          m["mem_ratio"], m.get("heldout_mem_ratio"), m.get("fd"), m.get("fid"), run.info.start_time,
                          _curve(client, evaluation.info.run_id if evaluation else None))
            if model == "baseline":
                key = (point.mem_ratio, point.fd, point.fid)
                if key in seen_baselines:
                    continue
                seen_baselines.add(key)
            points.append(point)
    return points


def _final_metrics(parent, model: str, evaluation) -> dict[str, float] | None:
    """A model's final metrics: the report's on the parent run, else its evaluation's; None if neither."""
    prefix = model + "."
    if prefix + "mem_ratio" in parent.data.metrics:
        return {k[len(prefix):]: v for k, v in parent.data.metrics.items() if k.startswith(prefix)}
    if evaluation is not None and "mem_ratio" in evaluation.data.metrics:
        return dict(evaluation.data.metrics)
    return None


def _evaluations(client: MlflowClient, experiment_id: str) -> dict:
    """(parent run, model) -> its finished `evaluate <model>` run."""
    runs = client.search_runs([experiment_id], "attributes.run_name LIKE 'evaluate %'", max_results=50000)
    return {(r.data.tags.get("mlflow.parentRunId"), r.info.run_name.split(" ", 1)[1]): r
            for r in runs if r.info.status == "FINISHED"}


def curve_rows(client: MlflowClient, run_id: str, keys: tuple[str, ...]) -> list[dict[str, float]]:
    """An evaluation's curve over training: per checkpoint (MLflow step, in order) the `round_<key>`
    metrics, for the checkpoints that have all of them."""
    by_key = {key: {h.step: h.value for h in client.get_metric_history(run_id, f"round_{key}")} for key in keys}
    steps = sorted(set.intersection(*(set(v) for v in by_key.values())))
    return [{key: by_key[key][s] for key in keys} for s in steps]


def _curve(client: MlflowClient, run_id: str | None) -> tuple[tuple[float, float], ...]:
    """The evaluation's memorization-vs-FD curve over training."""
    if run_id is None:
        return ()
    return tuple((r["fd"], r["mem_ratio"]) for r in curve_rows(client, run_id, ("fd", "mem_ratio")))


def quality_key(points: list[Point]) -> str:
    """Inception FID when every point has it (one scale for all), else the classifier FD."""
    return "fid" if points and all(p.fid is not None for p in points) else "fd"


def pareto(xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Mask of the points no other point beats on both (lower x and lower y, one strictly)."""
    keep = np.ones(len(xs), bool)
    for i in range(len(xs)):
        no_worse = (xs <= xs[i]) & (ys <= ys[i])
        better = (xs < xs[i]) | (ys < ys[i])
        keep[i] = not np.any(no_worse & better)
    return keep


def save_tradeoff(points: list[Point], path, current_run: str | None = None) -> None:
    """Left: every final model, quality (x) against memorization ratio (y), both lower is better.
    Right: every model's curve over training (feature FD of the curve samples)."""
    key = quality_key(points)
    usable = [p for p in points if getattr(p, key) is not None and math.isfinite(getattr(p, key))]
    fig = Figure(figsize=(12, 4.2))
    ax, over = fig.subplots(1, 2)
    _draw_curves(over, points)
    if not usable:
        ax.text(0.5, 0.5, "no finished runs in MLflow yet", ha="center", va="center", transform=ax.transAxes)
    else:
        xs = np.array([getattr(p, key) for p in usable])
        ys = np.array([p.mem_ratio for p in usable])
        front = pareto(xs, ys)
        order = np.argsort(xs[front])
        ax.step(xs[front][order], ys[front][order], where="post", color="0.6", linewidth=1,
                label="Pareto front", zorder=1)
        variants = sorted({p.variant for p in usable}, key=mitigation.variant_sort_key)
        for v, marker in zip(variants, MARKERS * len(variants)):
            idx = [i for i, p in enumerate(usable) if p.variant == v]
            ax.scatter(xs[idx], ys[idx], marker=marker, s=45, label=v, zorder=2)
        for p, x, y in zip(usable, xs, ys):
            text = f"tau={p.tau:g}" if p.tau is not None else ""
            if p.run_id == current_run:
                text = (text + " (this run)").strip()
            if text:
                ax.annotate(text, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        held = [p.heldout_mem_ratio for p in usable if p.heldout_mem_ratio is not None]
        if held:
            ax.axhline(float(np.mean(held)), color="k", linestyle=":", linewidth=1,
                       label="held-out real images")
        ax.legend(fontsize=7, loc="best")
    ax.set_xlabel(BY_KEY[key].axis_label)
    ax.set_ylabel(BY_KEY["mem_ratio"].axis_label)
    ax.set_title("Memorization vs quality, every run in MLflow", fontsize=9)
    _save_figure(fig, path)


def _draw_curves(ax, points: list[Point]) -> None:
    """One line per model through its checkpoints, a marker at its last; one colour per variant."""
    variants = sorted({p.variant for p in points if p.curve}, key=mitigation.variant_sort_key)
    colors = {v: f"C{i % 10}" for i, v in enumerate(variants)}
    for p in points:
        if p.curve:
            fd, mem = zip(*p.curve)
            ax.plot(fd, mem, color=colors[p.variant], linewidth=1, alpha=0.7, marker=".", markersize=3)
            ax.plot(fd[-1:], mem[-1:], color=colors[p.variant], marker="o", markersize=5)
    for v in variants:
        ax.plot([], [], color=colors[v], label=v)
    if variants:
        ax.legend(fontsize=7, loc="best")
        ax.set_xscale("log")  # FD spans decades over training
        ax.xaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
    else:
        ax.text(0.5, 0.5, "no curves in MLflow yet", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel(BY_KEY["fd"].axis_label + ", curve samples")
    ax.set_ylabel(BY_KEY["mem_ratio"].axis_label)
    ax.set_title("Over training: one line per model, checkpoints in training order", fontsize=9)


def markdown_table(points: list[Point]) -> str:
    def fmt(v, spec):
        return "-" if v is None else format(v, spec)

    rows = ["| run | model | variant | tau | memorization ratio | held-out reference | feature FD | Inception FID |",
            "|---|---|---|---|---|---|---|---|"]
    for p in points:
        rows.append(f"| {p.run_name} | {p.model} | {p.variant} | {fmt(p.tau, 'g')} | {p.mem_ratio:.3f} | "
                    f"{fmt(p.heldout_mem_ratio, '.3f')} | {fmt(p.fd, '.2f')} | {fmt(p.fid, '.2f')} |")
    return "\n".join(rows)


def main(tracking_uri: str, experiment: str, out_png: str | Path, current_run: str | None = None) -> list[Point]:
    """Collect every run of `experiment` at `tracking_uri`, save the figure, return the points."""
    points = collect(MlflowClient(tracking_uri=tracking_uri), experiment)
    save_tradeoff(points, out_png, current_run)
    return points
