"""Duplicate groups, memorization against the de-duplicated training set, and copy counts."""
import math

import numpy as np
import pytest
import torch

from pipeline.core import dedup, metrics

pytestmark = pytest.mark.usefixtures("one_thread")


def random_uint8(n: int, seed: int, shape=(3, 8, 8)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, *shape), dtype=np.uint8)


def to_unit(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).float().div(127.5).sub(1.0)


def test_groups_are_numbered_by_first_appearance():
    a, b, c = random_uint8(3, 0)
    groups = dedup.duplicate_groups(np.stack([b, a, b, c, a, b]))
    np.testing.assert_array_equal(groups.group, [0, 1, 0, 2, 1, 0])
    np.testing.assert_array_equal(groups.representatives, [0, 1, 3])
    np.testing.assert_array_equal(groups.sizes, [3, 2, 1])
    assert groups.summary() == {"duplicate_groups": 2, "largest_group": 3,
                                "duplicated_samples": 5, "unique_images": 3}


def test_images_one_grey_level_apart_are_not_duplicates():
    a = random_uint8(1, 1)[0]
    b = a.copy()
    b[2, 7, 7] ^= 1
    groups = dedup.duplicate_groups(np.stack([a, b, a]))
    np.testing.assert_array_equal(groups.group, [0, 1, 0])
    assert groups.summary()["duplicate_groups"] == 1


def test_copy_of_a_duplicated_image_is_flagged_only_after_dedup():
    """The measured failure: image A stored twice, a generated A + 1% noise. Against the raw set
    NN2 is the duplicate (ratio 1.000, not counted); against the de-duplicated set it is a copy."""
    train_u8 = random_uint8(20, 2)
    train_u8[7] = train_u8[3]
    train = to_unit(train_u8)
    g = torch.Generator().manual_seed(0)
    sample = (train[3] + 0.01 * torch.randn(train[3].shape, generator=g)).unsqueeze(0)

    plain = metrics.memorization_scores(sample, train)
    assert plain["ratio"][0] == pytest.approx(1.0, abs=1e-3)
    assert not plain["ratio"][0] < metrics.MEMORIZED_RATIO

    groups = dedup.duplicate_groups(train_u8)
    scores = dedup.dedup_memorization_scores(sample, train, groups)
    assert scores["ratio"][0] < metrics.MEMORIZED_RATIO
    assert scores["nn1_index"][0] == 3 and scores["nn1_group"][0] == groups.group[3]
    table = dedup.copy_counts(scores, groups)
    assert table[groups.group[3]]["copies"] == 1 and table[groups.group[3]]["size"] == 2


def test_without_duplicates_scores_equal_plain_scores():
    train_u8 = random_uint8(30, 3)
    train, samples = to_unit(train_u8), to_unit(random_uint8(12, 4))
    groups = dedup.duplicate_groups(train_u8)
    assert groups.summary()["duplicate_groups"] == 0
    plain = metrics.memorization_scores(samples, train)
    scores = dedup.dedup_memorization_scores(samples, train, groups)
    for key in plain:
        np.testing.assert_array_equal(scores[key], plain[key], err_msg=key)
    np.testing.assert_array_equal(scores["nn1_group"], plain["nn1_index"])


def test_planted_copies_are_counted_on_their_image():
    train_u8 = random_uint8(50, 5)
    train = to_unit(train_u8)
    samples = to_unit(random_uint8(40, 6))
    j, k = 17, 4
    g = torch.Generator().manual_seed(1)
    for slot in (3, 11, 25, 38)[:k]:
        samples[slot] = train[j] + 0.02 * torch.randn(train[j].shape, generator=g)
    groups = dedup.duplicate_groups(train_u8)
    table = dedup.copy_counts(dedup.dedup_memorization_scores(samples, train, groups), groups)
    copies = np.array([row["copies"] for row in table])
    assert copies[j] == k and copies.sum() == k
    assert table[j]["nearest"] >= k and sum(row["nearest"] for row in table) == len(samples)
    head = dedup.copy_headline(table)
    assert head["distinct_copied"] == 1
    assert math.isnan(head["copies_on_duplicated_share"])  # no duplicated image to fall on


def _table(sizes, copies):
    return [{"group": i, "position": i, "size": s, "copies": c, "nearest": c} for i, (s, c) in
            enumerate(zip(sizes, copies))]


def test_copies_on_duplicated_share_by_hand():
    # groups of sizes 3, 1, 2, 1 copied 2, 1, 1, 0 times: 3 of the 4 copies are of duplicated images
    head = dedup.copy_headline(_table([3, 1, 2, 1], [2, 1, 1, 0]))
    assert head == {"distinct_copied": 3, "copies_on_duplicated_share": 0.75}


def test_copies_on_duplicated_share_is_nan_when_undefined():
    assert math.isnan(dedup.copy_headline(_table([3, 1], [0, 0]))["copies_on_duplicated_share"])
    assert math.isnan(dedup.copy_headline(_table([1, 1], [2, 1]))["copies_on_duplicated_share"])


def test_copy_counts_accepts_plain_scores_through_the_group_map():
    """A plain score's nn1_index may be any member of a group; it must land on the group."""
    a, b = random_uint8(2, 7)
    groups = dedup.duplicate_groups(np.stack([a, b, a]))
    scores = {"nn1_index": np.array([2, 0, 1]), "ratio": np.array([0.1, 0.5, 0.2])}
    table = dedup.copy_counts(scores, groups)
    assert [(row["copies"], row["nearest"]) for row in table] == [(1, 2), (1, 1)]
