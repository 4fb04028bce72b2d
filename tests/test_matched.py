"""Memorization at matched quality: interpolation along the baseline's curve, by hand."""
import math

import pytest

from pipeline.compare import matched


def test_monotone_curve_interpolates_linearly_and_hits_checkpoints():
    fd, mem = [50, 30, 20, 15], [0.0, 0.1, 0.3, 0.5]
    assert matched.interpolate_at(fd, mem, 25) == (pytest.approx(0.2), "ok")
    assert matched.interpolate_at(fd, mem, 30) == (pytest.approx(0.1), "ok")
    assert matched.interpolate_at(fd, mem, 15) == (pytest.approx(0.5), "ok")


def test_out_of_range_is_not_extrapolated():
    fd, mem = [50, 30, 20, 15], [0.0, 0.1, 0.3, 0.5]
    assert matched.interpolate_at(fd, mem, 10) == (None, "out_of_range_better")
    assert matched.interpolate_at(fd, mem, 60) == (None, "out_of_range_worse")
    assert matched.interpolate_at([], [], 10) == (None, "no_curve")
    assert matched.interpolate_at(fd, mem, math.nan) == (None, "no_curve")


def test_non_monotone_curve_takes_the_first_crossing_in_training_order():
    # FD falls to 20, rises to 30, falls to 10: FD 25 is passed three times, first on 50 -> 20
    fd, mem = [50, 20, 30, 10], [0.0, 0.2, 0.4, 0.8]
    assert matched.crossings(fd, 25) == pytest.approx([5 / 6, 1.5, 2.25])
    assert matched.interpolate_at(fd, mem, 25) == (pytest.approx(5 / 6 * 0.2), "ok")
    # FD 15 only lies on the last segment: the earlier dip to 20 does not reach it
    assert matched.interpolate_at(fd, mem, 15) == (pytest.approx(0.4 + 0.75 * 0.4), "ok")


def test_a_run_of_checkpoints_at_the_target_is_one_crossing():
    assert matched.crossings([40, 30, 30, 20, 30], 30) == [1.0, 4.0]
    assert matched.crossings([30], 30) == [0.0]
    assert matched.interpolate_at([40, 30, 30, 20], [0.1, 0.2, 0.9, 1.0], 30) == (pytest.approx(0.2), "ok")


def test_points_without_a_value_are_dropped():
    assert matched.interpolate_at([50, math.nan, 20], [0.0, 0.5, 0.3], 35) == (pytest.approx(0.15), "ok")


def curve():
    # rows deliberately out of round order
    return [{"round": 3, "fd": 20.0, "mem_ratio": 0.3, "mean_nn1": 3.0},
            {"round": 1, "fd": 50.0, "mem_ratio": 0.0, "mean_nn1": 5.0},
            {"round": 4, "fd": 15.0, "mem_ratio": 0.5, "mean_nn1": 2.0},
            {"round": 2, "fd": 30.0, "mem_ratio": 0.1, "mean_nn1": 4.0}]


def test_matched_quality_differences():
    out = matched.matched_quality(curve(), model_fd=25.0, model_mem=0.1, model_nn1=4.0)
    assert out["baseline_mem_at_matched_quality"] == pytest.approx(0.2)
    assert out["mem_at_matched_quality"] == pytest.approx(-0.1)  # copies less at equal quality
    assert out["nn1_at_matched_quality"] == pytest.approx(0.5)   # baseline: 3.5
    assert out["matched_quality_status"] == "ok" and out["matched_quality_crossings"] == 1


def test_matched_quality_out_of_range_gives_nan_and_says_why():
    out = matched.matched_quality(curve(), model_fd=12.0, model_mem=0.1, model_nn1=4.0)
    assert out["matched_quality_status"] == "out_of_range_better"
    assert all(math.isnan(out[k]) for k in ("mem_at_matched_quality", "baseline_mem_at_matched_quality",
                                            "nn1_at_matched_quality"))
