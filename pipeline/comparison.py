"""What the report derives from both evaluations: memorization at matched quality (each model's
last curve point read against the baseline's memorization-vs-FD curve, so that "copies less" is
not "trained less") and per-image risk (the IET run's AGC skip rates against the images the
baseline copies: does AGC skip the right ones?)."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from pipeline import frontier
from pipeline.dedup import DuplicateGroups
from pipeline.matched import matched_quality
from pipeline.risk import risk_summary

RISK_FIELDS = ["sample_id", "size", "baseline_copies", "baseline_loss", "iet_skip_rate"]
MATCHING_COLUMNS = ("round", "fd", "mem_ratio", "mean_nn1")  # what at_matched_quality reads of a curve
RESAMPLES = 200  # bootstrap replicates of the frontier comparison
# the quality measures the frontier comparison reads: the headline (KID, unbiased at any sample
# count) and the check (FD): a verdict that holds on one only is not a verdict
FRONTIER_MEASURES = {"": frontier.KID, "_fd": frontier.FD}


def frontier_numbers(models: dict[str, list[frontier.Curve]], baseline: list[frontier.Curve]) -> dict[str, dict]:
    """Each model's memorization-quality frontier against the baseline's (pipeline/frontier.py),
    its runs (seeds) and theirs: memorization at matched quality and the mean difference over the
    common quality range (model - baseline), each with its 95% bootstrap interval, under KID and
    again under FD (keys suffixed _fd); NaN where not comparable. The floor is the baseline's
    held-out memorization ratio (what real images never trained on get)."""
    reference = baseline[0].reference
    floor = float(np.mean([c.floor for c in baseline]))
    out = {name: {} for name in models}
    for suffix, measure in FRONTIER_MEASURES.items():
        compared = frontier.compare_models({n: [c.run() for c in curves] for n, curves in models.items()},
                                           [c.run() for c in baseline], measure(reference), RESAMPLES, floor)
        for name, result in compared.items():
            out[name].update(_interval_numbers(result, suffix))
    return out


def frontier_lines(models: dict[str, list[frontier.Curve]], points: int = 64) -> dict[str, dict]:
    """What figures.save_frontiers draws of each model, under KID against the first model's
    reference: its checkpoints' (quality, memorization), its frontier (mean over its runs) on a grid
    of quality levels over the range it reaches, and the band's ends there. Models without a curve
    are left out."""
    models = {name: curves for name, curves in models.items() if all(len(c.progress) for c in curves)}
    if not models:
        return {}
    measure = frontier.KID(next(iter(models.values()))[0].reference)
    out = {}
    for name, (fitted, _) in frontier.resample_models({n: [c.run() for c in cs] for n, cs in models.items()},
                                                     measure, RESAMPLES).items():
        fits = [f.frontier for f in fitted.point]
        levels = np.linspace(max(f.best for f in fits), min(f.worst for f in fits), points)
        low, high = frontier.band(fitted, levels)
        out[name] = {"quality": np.concatenate([f.raw_quality for f in fitted.point]),
                     "memorization": np.concatenate([f.raw_memorization for f in fitted.point]),
                     "levels": levels, "frontier": np.mean([f(levels) for f in fits], axis=0), "low": low, "high": high}
    return out


def _interval_numbers(result: frontier.FrontierComparison, suffix: str) -> dict[str, float]:
    numbers = {}
    for key, interval in (("mem_matched", result.matched), ("frontier_area", result.area),
                          ("mem_matched_relative", result.relative)):
        numbers.update({key + suffix: interval.estimate, f"{key}{suffix}_low": interval.low,
                        f"{key}{suffix}_high": interval.high})
    numbers[f"frontier_undefined{suffix}"] = result.undefined / result.resamples
    numbers[f"baseline_copies_in_range{suffix}"] = result.point.baseline_copies
    return numbers


def frontier_verdict(numbers: dict, key: str = "mem_matched") -> str:
    """The verdict word (frontier.verdict) of one of frontier_numbers' differences and its interval
    (`key`: mem_matched, frontier_area, or either with _fd)."""
    interval = frontier.Interval(*(numbers.get(key + end, np.nan) for end in ("", "_low", "_high")))
    return frontier.verdict(interval, bool(np.isfinite(interval.estimate)))


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
