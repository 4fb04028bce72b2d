"""Memorization against quality for every model the MLflow experiment holds: one point per model.

Each pipeline execution (a `dvc repro` or a `dvc exp run`) has a parent run whose params are the
whole params.yaml (commands/mlflow_results.py reads them), so experiments over agc.tau, or with
MSR/TAA/AGC switched off, appear here as points labelled by variant and tau, and the non-dominated
ones (no other point both memorizes less and has a lower distance) form the Pareto front.
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

from commands.mlflow_results import ModelResult, curve, read_results  # noqa: E402
from pipeline import mitigation  # noqa: E402
from pipeline.core.figures import _save_figure  # noqa: E402
from pipeline.evaluate.metric_names import BY_KEY, TRADEOFF, shown_in  # noqa: E402

MARKERS = "osD^vP*Xph<>"  # cycled: any number of variants


@dataclass(frozen=True)
class Point(ModelResult):
    curve: tuple[tuple[float, float], ...] = ()  # (FD, memorization ratio) of its checkpoints, in training order


def collect(client: MlflowClient, experiment: str) -> list[Point]:
    """Every model of the experiment (mlflow_results.read_results: a baseline that DVC kept cached
    across experiments is listed once), each with its memorization-vs-FD curve over training."""
    points = []
    for result in read_results(client, experiment):
        rows = curve(client, result, ("fd", "mem_ratio"))
        points.append(Point(**vars(result), curve=tuple((r["fd"], r["mem_ratio"]) for r in rows)))
    return points


def quality_key(points: list[Point]) -> str:
    """Inception FID when every point has it (one scale for all), else the classifier FD."""
    return "fid" if points and all(p.metrics.get("fid") is not None for p in points) else "fd"


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
    usable = [p for p in points if p.metrics.get(key) is not None and math.isfinite(p.metrics[key])]
    fig = Figure(figsize=(12, 4.2))
    ax, over = fig.subplots(1, 2)
    _draw_curves(over, points)
    if not usable:
        ax.text(0.5, 0.5, "no finished runs in MLflow yet", ha="center", va="center", transform=ax.transAxes)
    else:
        xs = np.array([p.metrics[key] for p in usable])
        ys = np.array([p.metrics["mem_ratio"] for p in usable])
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
        held = [p.metrics["heldout_mem_ratio"] for p in usable if p.metrics.get("heldout_mem_ratio") is not None]
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
    columns = shown_in(TRADEOFF)
    rows = ["| run | model | variant | tau | " + " | ".join(c.label for c in columns) + " |",
            "|---" * (4 + len(columns)) + "|"]
    for p in points:
        tau = "-" if p.tau is None else format(p.tau, "g")
        rows.append(f"| {p.run_name} | {p.model} | {p.variant} | {tau} | "
                    + " | ".join(c.format(p.metrics.get(c.key)) for c in columns) + " |")
    return "\n".join(rows)


def main(tracking_uri: str, experiment: str, out_png: str | Path, current_run: str | None = None) -> list[Point]:
    """Collect every run of `experiment` at `tracking_uri`, save the figure, return the points."""
    points = collect(MlflowClient(tracking_uri=tracking_uri), experiment)
    save_tradeoff(points, out_png, current_run)
    return points
