"""Per training image: did IET-AGC+'s own signal (how often AGC skipped it) point at the images the
baseline went on to copy?

AGC skips a sample whose loss falls well below the running loss at its timestep (the IET-AGC paper,
Liu et al., ECCV 2024), on the premise that a low loss marks a sample being memorized; duplicated images are
the ones most often copied (Carlini et al. 2023, "Extracting Training Data from Diffusion Models";
Somepalli et al. 2023). This checks both premises on the run's data: the ROC AUC of the skip rate,
and of minus the baseline's final loss, for "copied at least once by the baseline", and the skip
rate of duplicated against unique images.
"""
from __future__ import annotations

import math

import numpy as np

from pipeline.evaluate.privacy import roc_auc

RISK_SKIP_AUC = "risk_skip_auc"
RISK_LOSS_AUC = "risk_loss_auc"
RISK_COPIED_IMAGES = "risk_copied_images"
SKIP_RATE_DUPLICATED = "skip_rate_duplicated"
SKIP_RATE_UNIQUE = "skip_rate_unique"


def _auc_for(score: np.ndarray, positive: np.ndarray) -> float:
    """AUC of `score` for `positive`, over the images whose score is finite (an image AGC never
    drew has no skip rate); NaN when either class is empty."""
    ok = np.isfinite(score)
    return roc_auc(score[ok & positive], score[ok & ~positive])


def _mean(x: np.ndarray) -> float:
    x = x[np.isfinite(x)]
    return float(x.mean()) if len(x) else math.nan


def risk_summary(skip_rate, baseline_loss, copies, group_size) -> dict[str, float]:
    """Arrays with one entry per unique training image (dedup.copy_counts' rows): IET's skip
    rate, the baseline's final per-sample loss, the baseline's copy count, the duplicate group size.

    'risk_skip_auc': ROC AUC of the skip rate for copies > 0 (0.5: no better than chance);
    'risk_loss_auc': the same for minus the baseline loss (low loss = at risk);
    'skip_rate_duplicated' / 'skip_rate_unique': mean skip rate of images with group size > 1 / 1.
    NaN where undefined: no copied or no uncopied image, no duplicated or no unique image."""
    skip = np.asarray(skip_rate, np.float64)
    loss = np.asarray(baseline_loss, np.float64)
    copied = np.asarray(copies) > 0
    size = np.asarray(group_size)
    if not skip.shape == loss.shape == copied.shape == size.shape:
        raise ValueError(f"one entry per image expected, got {skip.shape}, {loss.shape}, "
                         f"{copied.shape}, {size.shape}")
    return {
        RISK_SKIP_AUC: _auc_for(skip, copied),
        RISK_LOSS_AUC: _auc_for(-loss, copied),
        RISK_COPIED_IMAGES: int(copied.sum()),
        SKIP_RATE_DUPLICATED: _mean(skip[size > 1]),
        SKIP_RATE_UNIQUE: _mean(skip[size == 1]),
    }
