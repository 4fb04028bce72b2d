"""Memorization at matched quality (docs/method.md#matched-quality).

Memorization and sample quality both grow with training, so a mitigated model that memorizes less
may only be an earlier point of the baseline's own curve, which stopping the baseline early would
give too. The baseline's memorization is read off its (quality, memorization) curve over
checkpoints at the mitigated model's quality, and the difference is what the mitigation buys.
"""
from __future__ import annotations

import math

import numpy as np

MEM_AT_MATCHED_QUALITY = "mem_at_matched_quality"
BASELINE_MEM_AT_MATCHED_QUALITY = "baseline_mem_at_matched_quality"
NN1_AT_MATCHED_QUALITY = "nn1_at_matched_quality"
MATCHED_QUALITY_STATUS = "matched_quality_status"  # a string: log it as a tag or param, not a metric
MATCHED_QUALITY_CROSSINGS = "matched_quality_crossings"

OK = "ok"
BETTER_THAN_CURVE = "out_of_range_better"  # quality below the curve's lowest FD: better than any checkpoint
WORSE_THAN_CURVE = "out_of_range_worse"    # above its highest FD
NO_CURVE = "no_curve"                      # no finite point, or the quality itself is not finite


def crossings(curve_quality, quality: float) -> list[float]:
    """Every place along the curve where its quality equals `quality`, in training order, as a
    position s along it: checkpoint i is s = i, and s = i + f is (1 - f) * curve[i] + f * curve[i + 1].
    A run of checkpoints sitting at the target counts once, at its start."""
    q = np.asarray(curve_quality, np.float64)
    found: list[float] = []
    last_end = -math.inf
    for i in range(len(q)):
        b = q[i + 1] if i + 1 < len(q) else q[i]
        if not min(q[i], b) <= quality <= max(q[i], b):
            continue
        start = float(i) if q[i] == b else i + (quality - q[i]) / (b - q[i])
        end = float(i + 1) if q[i] == b == quality else start
        if start > last_end:  # touching the previous crossing (a shared checkpoint) is the same one
            found.append(start)
        last_end = max(last_end, end)
    return found


def interpolate_at(curve_quality, curve_values, quality: float) -> tuple[float | None, str]:
    """The baseline's value at `quality`, read off its curve: points in training order (rounds or
    checkpoints), quality an FD (lower is better), joined piecewise linearly.

    FD along training is not monotone (it dips and rises again when a model starts copying), so
    the curve may pass the target FD more than once. The first crossing in training order is
    taken: it is the earliest-stopped baseline of that quality, the one "stopping early" would give,
    and as memorization grows with training it is also the hardest one to beat. A target outside
    [min, max] of the curve's FD is not extrapolated: (None, out_of_range_better / _worse).
    Points with a non-finite quality or value are dropped first; (None, no_curve) when none is left
    or the target is not finite."""
    q = np.asarray(curve_quality, np.float64)
    v = np.asarray(curve_values, np.float64)
    if q.shape != v.shape:
        raise ValueError(f"curve has {len(q)} qualities but {len(v)} values")
    keep = np.isfinite(q) & np.isfinite(v)
    q, v = q[keep], v[keep]
    if not len(q) or not math.isfinite(quality):
        return None, NO_CURVE
    if quality < q.min():
        return None, BETTER_THAN_CURVE
    if quality > q.max():
        return None, WORSE_THAN_CURVE
    s = crossings(q, quality)[0]
    i, f = int(s), s - int(s)
    value = v[i] if f == 0.0 else (1 - f) * v[i] + f * v[i + 1]
    return float(value), OK


def matched_quality(baseline_curve: list[dict], model_fd: float, model_mem: float, model_nn1: float,
                    progress_key: str = "round", fd_key: str = "fd", mem_key: str = "mem_ratio",
                    nn1_key: str = "mean_nn1") -> dict:
    """The model's memorization minus the baseline's at the model's FD (interpolate_at), for the
    memorization ratio and the mean NN1 distance; rows of `baseline_curve` are sorted by
    `progress_key` first. Negative mem_at_matched_quality (positive nn1_at_matched_quality) means
    the model copies less than the baseline does at the same quality. NaN when out of range; the
    status says why; 'matched_quality_crossings' counts how often the curve passes model_fd."""
    # a checkpoint missing any of the three is dropped from both curves, so both read the same crossing
    rows = [r for r in sorted(baseline_curve, key=lambda r: r[progress_key])
            if all(math.isfinite(float(r[k])) for k in (fd_key, mem_key, nn1_key))]
    fd = [r[fd_key] for r in rows]
    base_mem, status = interpolate_at(fd, [r[mem_key] for r in rows], model_fd)
    base_nn1, _ = interpolate_at(fd, [r[nn1_key] for r in rows], model_fd)
    matched = status == OK
    return {
        MEM_AT_MATCHED_QUALITY: model_mem - base_mem if matched else math.nan,
        BASELINE_MEM_AT_MATCHED_QUALITY: base_mem if matched else math.nan,
        NN1_AT_MATCHED_QUALITY: model_nn1 - base_nn1 if matched else math.nan,
        MATCHED_QUALITY_STATUS: status,
        MATCHED_QUALITY_CROSSINGS: len(crossings(fd, model_fd)) if matched else 0,
    }
