"""data.duplicates.near: the added copies as near duplicates (seeded small transforms, none
pixel-identical), and prepare's report of how near they are and which near_duplicate thresholds
catch them without merging distinct images."""
import json

import numpy as np
import pytest
from click.testing import CliRunner

from pipeline.core import data
from pipeline.core.config import DataConfig
from pipeline.core.data import prepare_splits
from pipeline.core.dedup import near_copy_report, near_duplicate_groups
from stages import prepare
from test_stages import _params

NEAR = {"images": 4, "copies": 5, "near": True}


def _splits(seed=0, **duplicates):
    return prepare_splits(DataConfig(train_size=40, heldout_size=20, duplicates=duplicates), seed)


def _positions(s) -> np.ndarray:
    """Each training position's original's position."""
    where = {i: p for p, i in enumerate(s.train.ids.tolist())}
    return np.array([where[i] for i in s.copy_of.tolist()])


def test_near_copies_differ_from_their_original_and_each_other_and_are_seeded():
    exact, near = _splits(**{**NEAR, "near": False}), _splits(**NEAR)
    # the same samples, ids, labels and originals: only the copies' pixels differ
    for name in ("ids", "labels"):
        np.testing.assert_array_equal(getattr(exact.train, name), getattr(near.train, name))
    np.testing.assert_array_equal(exact.copy_of, near.copy_of)
    np.testing.assert_array_equal(exact.train.images[:40], near.train.images[:40])
    original = _positions(near)
    copies = np.flatnonzero(original != np.arange(len(original)))
    assert len(copies) == 16 and (exact.train.images[copies] == exact.train.images[original[copies]]).all()
    flat = near.train.images.reshape(len(original), -1)
    assert len({row.tobytes() for row in flat}) == len(flat)  # no two samples pixel-identical
    diff = np.abs(flat[copies].astype(int) - flat[original[copies]].astype(int))
    assert (diff.max(1) > 0).all()
    np.testing.assert_array_equal(_splits(**NEAR).train.images, near.train.images)  # seeded
    assert not np.array_equal(_splits(seed=1, **NEAR).train.images[40:], near.train.images[40:])


def test_a_near_copy_is_a_small_shift_brightness_and_noise(monkeypatch):
    image = np.random.default_rng(0).integers(40, 200, (1, 8, 8), dtype=np.uint8)
    monkeypatch.setattr(data, "NEAR_SHIFT", 0)
    copy = data.near_copy(image, np.random.default_rng(1)).astype(float)
    # unshifted: within brightness 3% of 200 plus a few sd of 2 grey levels
    assert 0 < np.abs(copy - image).max() <= 0.03 * 200 + 5 * data.NEAR_NOISE
    # a flat black image cannot give 5 different copies often enough: said, not looped forever
    monkeypatch.setattr(data, "NEAR_NOISE", 0.0)
    with pytest.raises(data.DataError, match="never all different"):
        data.near_copies(np.zeros((1, 1, 4, 4), np.uint8), np.array([0]), 4, np.random.default_rng(0))


def test_the_reported_threshold_catches_every_copy_and_merges_no_distinct_image(monkeypatch):
    monkeypatch.setattr(data, "NEAR_SHIFT", 0)  # brightness and noise only: copies a threshold can catch
    s = _splits(**NEAR)
    original = _positions(s)
    report = near_copy_report(s.train.images, original)
    t = report["thresholds"]
    assert t["any_works"] and t["catch_above"] < t["suggested"] < t["merges_at"]
    assert len(report["copies"]) == 16 and max(c["rms"] for c in report["copies"]) == report["rms_to_original"]["max"]
    assert report["rms_to_original"]["max"] < report["distinct_images"]["min"] == t["merges_at"]
    truth = original  # each sample's group: its original (the 40 originals are distinct here)

    def same_grouping(threshold):
        found = near_duplicate_groups(s.train.images, threshold).group
        return all(len(set(found[truth == g])) == 1 for g in np.unique(truth)) and len(set(found)) == len(set(truth))
    # near_duplicate_groups joins below t: every t in (catch_above, merges_at] works (a relative
    # margin: cdist's rounding differs with the matrices' sizes)
    assert all(same_grouping(x) for x in (t["suggested"], t["catch_above"] * 1.001, t["merges_at"] * 0.999))
    assert not same_grouping(t["catch_above"] * 0.999)  # a copy's longest link left out
    assert not same_grouping(t["merges_at"] * 1.001)  # two distinct images joined
    assert not same_grouping(0.0)  # exact de-duplication finds none of them


def test_shifted_copies_lie_as_far_as_distinct_images():
    report = near_copy_report((s := _splits(**NEAR)).train.images, _positions(s))
    t = report["thresholds"]
    # a shifted copy lies farther from its original than the two closest distinct images: no threshold works
    assert not t["any_works"] and t["suggested"] is None and t["catch_above"] > t["merges_at"]


def test_prepare_reports_the_near_copies_in_info_json(tmp_path):
    out = tmp_path / "prepared"
    params = _params(tmp_path, data={"train_size": 40, "heldout_size": 20, "duplicates": NEAR})
    result = CliRunner().invoke(prepare.main, ["--params", params, "--out", str(out)])
    assert result.exit_code == 0, result.output
    info = json.loads((out / "info.json").read_text())
    near = info["near_copies"]
    copy_of = dict(np.loadtxt(out / "copy_of.csv", delimiter=",", skiprows=1, dtype=int).tolist())
    assert {c["sample_id"]: c["copy_of"] for c in near["copies"]} == copy_of
    assert set(near["distinct_images"]) == {"pairs", "min", "p1", "median"} and "near copies lie" in result.output
    assert info["train_duplicates"]["duplicate_groups"] == 0  # no exact duplicates left
    plain = tmp_path / "plain"
    params = _params(tmp_path, data={"train_size": 40, "heldout_size": 20, "duplicates": {**NEAR, "near": False}})
    assert CliRunner().invoke(prepare.main, ["--params", params, "--out", str(plain)]).exit_code == 0
    assert "near_copies" not in json.loads((plain / "info.json").read_text())
