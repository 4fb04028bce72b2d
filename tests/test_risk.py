"""Per-image risk: AUCs and mean skip rates on a table small enough to count by hand."""
import math

import numpy as np
import pytest

from pipeline.compare import risk

COPIES = [0, 2, 0, 1, 0, 0, 3, 0]                 # copied: images 1, 3, 6
SKIP = [0.1, 0.5, 0.2, 0.3, 0.4, 0.0, 0.9, 0.25]
LOSS = [1.0, 0.2, 1.0, 0.5, 0.1, 2.0, 0.3, 1.0]
SIZE = [1, 2, 1, 2, 1, 1, 3, 1]                   # duplicated: images 1, 3, 6


def test_hand_counted_table():
    out = risk.risk_summary(SKIP, LOSS, COPIES, SIZE)
    # skip: 0.5 and 0.9 beat all 5 uncopied, 0.3 beats 4 of them (not 0.4): 14 of 15 pairs
    assert out["risk_skip_auc"] == pytest.approx(14 / 15)
    # minus loss: each copied image beats the four uncopied with loss >= 1 but not the one at 0.1
    assert out["risk_loss_auc"] == pytest.approx(12 / 15)
    assert out["risk_copied_images"] == 3
    assert out["skip_rate_duplicated"] == pytest.approx((0.5 + 0.3 + 0.9) / 3)
    assert out["skip_rate_unique"] == pytest.approx((0.1 + 0.2 + 0.4 + 0.0 + 0.25) / 5)


def test_ties_count_half_and_unscored_images_are_left_out():
    skip = [0.5, 0.5, np.nan, 0.2]
    out = risk.risk_summary(skip, [1.0, 1.0, 1.0, 1.0], [1, 0, 5, 0], [1, 1, 1, 1])
    # copied image 0 (0.5) vs uncopied 0.5 (tie: 1/2) and 0.2 (1); image 2 has no skip rate
    assert out["risk_skip_auc"] == pytest.approx(0.75)
    assert out["risk_loss_auc"] == pytest.approx(0.5)  # equal losses: no information
    assert out["skip_rate_unique"] == pytest.approx(0.4)


def test_undefined_cases_are_nan():
    out = risk.risk_summary(SKIP, LOSS, [0] * 8, [1] * 8)
    assert math.isnan(out["risk_skip_auc"]) and math.isnan(out["risk_loss_auc"])
    assert math.isnan(out["skip_rate_duplicated"]) and out["risk_copied_images"] == 0


def test_mismatched_lengths_are_refused():
    with pytest.raises(ValueError, match="one entry per image"):
        risk.risk_summary(SKIP, LOSS[:-1], COPIES, SIZE)
