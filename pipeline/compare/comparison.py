"""What the report derives from both evaluations: memorization at matched quality (each model's
last curve point read against the baseline's memorization-vs-FD curve, so that "copies less" is
not "trained less") and per-image risk (the IET run's AGC skip rates against the images the
baseline copies: does AGC skip the right ones?)."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from pipeline.evaluate import frontier

from pipeline.compare import verdict
from pipeline.core.dedup import DuplicateGroups
from pipeline.core.layout import Rounds
from pipeline.compare.matched import matched_quality
from pipeline.compare.risk import risk_summary

RISK_FIELDS = ["sample_id", "size", "baseline_copies", "baseline_loss", "iet_skip_rate"]
MATCHING_COLUMNS = ("round", "fd", "mem_ratio", "mean_nn1")  # what at_matched_quality reads of a curve
RESAMPLES = 200  # bootstrap replicates of the frontier figures' bands
# FD extrapolated to infinitely many samples (Chong & Forsyth 2020) from subsets of these shares of a
# checkpoint's samples; only where the smallest subset has more samples than features (a covariance
# of full rank), else FD's check is left out: FD at a fixed small count is biased by an amount that
# depends on the model, which KID (the headline) is not.
FD_FRACTIONS = (0.5, 0.625, 0.75, 0.875, 1.0)


def _fd_infinity(reference: np.ndarray, samples: int):
    if FD_FRACTIONS[0] * samples <= reference.shape[1]:
        return None
    return frontier.FDInfinity(reference, FD_FRACTIONS)


# the quality measures the verdicts read: the headline (KID, unbiased at any sample count) and the
# check (FD extrapolated to infinite samples, where the sample count allows)
FRONTIER_MEASURES = {"": lambda reference, samples: frontier.KID(reference), "_fd": _fd_infinity}


def frontier_numbers(models: dict[str, list[frontier.Curve]], baseline: list[frontier.Curve],
                     margin: float = verdict.EQUIVALENCE_MARGIN) -> dict[str, dict]:
    """Each model's runs (seeds) against the baseline's at matched quality (pipeline/compare/verdict.py):
    memorization at matched quality, model - baseline, with its Welch interval over seeds, exact
    permutation p, equivalence p and floors' bounds, under KID and again under extrapolated FD (keys
    suffixed _fd; left out where the sample count is too small for it); NaN where not comparable.
    The floor is the baseline's held-out memorization ratio (what real images never trained on get)."""
    reference = baseline[0].reference
    floor = float(np.mean([c.floor for c in baseline]))
    out = {name: {} for name in models}
    for suffix, make in FRONTIER_MEASURES.items():
        measure = make(reference, min(c.memorized.shape[1] for cs in (*models.values(), baseline) for c in cs))
        if measure is None:
            continue
        base = frontier.point_fits([c.run() for c in baseline], measure)
        for name, curves in models.items():
            fits = frontier.point_fits([c.run() for c in curves], measure)
            samples = [c.memorized.shape[1] for c in (*curves, *baseline)]
            compared = verdict.compare_seeds(fits, base, floor, samples, margin)
            area = frontier.matched_difference([f.frontier for f in fits], [f.frontier for f in base], floor).area
            out[name].update(seed_numbers(compared, suffix), **{"frontier_area" + suffix: area})
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
    for name, fitted in frontier.resample_models({n: [c.run() for c in cs] for n, cs in models.items()},
                                                     measure, RESAMPLES).items():
        fits = [f.frontier for f in fitted.point]
        levels = np.linspace(max(f.best for f in fits), min(f.worst for f in fits), points)
        low, high = frontier.band(fitted, levels)
        out[name] = {"quality": np.concatenate([f.raw_quality for f in fitted.point]),
                     "memorization": np.concatenate([f.raw_memorization for f in fitted.point]),
                     "levels": levels, "frontier": np.mean([f(levels) for f in fits], axis=0), "low": low, "high": high}
    return out


def seed_numbers(c: verdict.SeedComparison, suffix: str = "") -> dict[str, float]:
    """A seed-level comparison as the metrics metric_names lists (mem_matched..., suffix _fd for FD)."""
    key = "mem_matched" + suffix
    return {key: c.estimate, f"{key}_low": c.low, f"{key}_high": c.high, f"{key}_p": c.p,
            f"{key}_p_min": c.p_min, f"{key}_equivalence_p": c.equivalence_p,
            f"{key}_model_bound": c.model_bound, f"{key}_baseline_bound": c.baseline_bound,
            f"{key}_model_seeds": len(c.model_scores), f"{key}_baseline_seeds": len(c.baseline_scores),
            f"{key}_model_score": float(np.mean(c.model_scores)) if c.model_scores else np.nan,
            f"{key}_baseline_score": float(np.mean(c.baseline_scores)) if c.baseline_scores else np.nan,
            f"mem_matched_relative{suffix}": c.relative, f"mem_matched_relative{suffix}_low": c.relative_low,
            f"mem_matched_relative{suffix}_high": c.relative_high,
            f"{key}_not_comparable": verdict.REASONS.index(c.reason)}


def read_comparison(numbers: dict, suffix: str = "") -> verdict.SeedComparison:
    """seed_numbers read back (the scores' means stand for the scores: what word() needs)."""
    key = "mem_matched" + suffix

    def get(name: str) -> float:
        return float(numbers.get(name, np.nan))
    reason = get(f"{key}_not_comparable")
    if reason != 0:  # NaN too: a number from before reasons were recorded
        return verdict.not_comparable(verdict.REASONS[int(reason)] if np.isfinite(reason) else verdict.NO_COMMON_RANGE)
    seeds = [int(get(f"{key}_{side}_seeds")) if np.isfinite(get(f"{key}_{side}_seeds")) else 0 for side in ("model", "baseline")]
    return verdict.SeedComparison(get(key), get(f"{key}_low"), get(f"{key}_high"), get(f"{key}_p"), get(f"{key}_p_min"),
                                  get(f"{key}_equivalence_p"), (get(f"{key}_model_score"),) * seeds[0],
                                  (get(f"{key}_baseline_score"),) * seeds[1], get(f"{key}_model_bound"),
                                  get(f"{key}_baseline_bound"), get(f"mem_matched_relative{suffix}"),
                                  get(f"mem_matched_relative{suffix}_low"), get(f"mem_matched_relative{suffix}_high"))


NOT_COMPUTED = "not computed"  # a quality measure the sample count did not allow (FD-infinity)


def frontier_verdict(numbers: dict, suffix: str = "", p: float | None = None) -> str:
    """The verdict in words (verdict.word) of frontier_numbers' comparison under KID (suffix "") or
    FD ("_fd"); `p` a multiplicity-adjusted p in place of the comparison's own. "not computed" where
    the measure was left out."""
    if "mem_matched" + suffix not in numbers:
        return NOT_COMPUTED
    return verdict.word(read_comparison(numbers, suffix), p)


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
    for table in Rounds(rounds_dir).loss_tables():
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
