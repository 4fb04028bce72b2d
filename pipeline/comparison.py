"""What the report derives from both evaluations: memorization at matched quality (each model's
last curve point read against the baseline's memorization-vs-FD curve, so that "copies less" is
not "trained less") and per-image risk (the IET run's AGC skip rates against the images the
baseline copies: does AGC skip the right ones?)."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from pipeline.dedup import DuplicateGroups
from pipeline.matched import matched_quality
from pipeline.risk import risk_summary

RISK_FIELDS = ["sample_id", "size", "baseline_copies", "baseline_loss", "iet_skip_rate"]
MATCHING_COLUMNS = ("round", "fd", "mem_ratio", "mean_nn1")  # what at_matched_quality reads of a curve


def read_rows(path: str | Path) -> list[dict]:
    """A CSV the pipeline wrote, numbers as floats (empty cells NaN)."""
    with open(path, newline="") as f:
        return [{k: float(v) if v != "" else float("nan") for k, v in row.items()} for row in csv.DictReader(f)]


def at_matched_quality(baseline_curve: list[dict], curve: list[dict]) -> dict:
    """matched_quality of a model's last curve point (same sample count and sampler as the
    baseline's points: FD is biased by the sample count, so the final evaluation's FD would not
    compare) against the baseline's curve."""
    if not curve:
        return matched_quality(baseline_curve, float("nan"), float("nan"), float("nan"))
    last = curve[-1]
    return matched_quality(baseline_curve, last["fd"], last["mem_ratio"], last["mean_nn1"])


def skip_rates(rounds_dir: str | Path, ids: np.ndarray) -> np.ndarray:
    """Each training position's AGC skip rate, averaged over the rounds' loss tables (NaN for a
    sample never drawn, or everywhere when the run kept no loss table: one shard)."""
    position = {int(i): p for p, i in enumerate(ids)}
    total, seen = np.zeros(len(ids)), np.zeros(len(ids))
    for table in sorted(Path(rounds_dir).glob("round_*/loss_table.csv")):
        for row in read_rows(table):
            p = position[int(row["sample_id"])]
            if row["drawn"] > 0:
                total[p] += row["skip_rate"]
                seen[p] += 1
    with np.errstate(invalid="ignore"):
        return np.where(seen > 0, total / np.maximum(seen, 1), np.nan)


def risk_table(groups: DuplicateGroups, ids: np.ndarray, baseline_copied: list[dict],
               skip_rate: np.ndarray) -> tuple[list[dict], dict]:
    """Per unique training image (rows of the baseline's copied.csv, in group order): how often
    the baseline copies it, its loss under the baseline, and IET's mean skip rate over its copies
    in the training set; with risk_summary's headline."""
    finite = np.isfinite(skip_rate)
    # mean over the group's drawn samples: sums and counts per group, NaN where none was drawn
    total = np.bincount(groups.group[finite], weights=skip_rate[finite], minlength=len(groups.sizes))
    drawn = np.bincount(groups.group[finite], minlength=len(groups.sizes))
    skip = np.divide(total, drawn, out=np.full(len(groups.sizes), np.nan), where=drawn > 0)
    rows = [{"sample_id": int(ids[groups.representatives[g]]), "size": int(groups.sizes[g]),
             "baseline_copies": int(r["copies"]), "baseline_loss": float(r["loss"]), "iet_skip_rate": float(skip[g])}
            for g, r in enumerate(baseline_copied)]
    summary = risk_summary(skip, [r["baseline_loss"] for r in rows], [r["baseline_copies"] for r in rows],
                           groups.sizes)
    return rows, summary
