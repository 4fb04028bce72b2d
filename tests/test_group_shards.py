"""iet.split: groups -- exact and near duplicates (resized or recompressed copies in a user's
folder, read through the real loader) form one group, every group lands whole in one shard within
the size limits, and MSR moves groups whole."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from PIL import Image

from pipeline.core.config import DataConfig, MSRConfig
from pipeline.core.data import _mnist5k, load_source
from pipeline.core.dedup import near_duplicate_groups
from pipeline.train.ensemble import split_shards
from pipeline.mitigation.msr import redistribute


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """20 distinct MNIST digits as PNGs; 4 of them saved again resized to 40 px as JPEG (quality 75),
    2 of those also as exact PNG copies under other names."""
    root = tmp_path_factory.mktemp("folder")
    images, _ = _mnist5k(DataConfig())
    origin = {}
    for i in range(20):
        (root / "digits").mkdir(exist_ok=True)
        Image.fromarray(images[i, 0]).save(root / "digits" / f"img_{i:02d}.png")
        origin[f"img_{i:02d}.png"] = i
    for i in range(4):
        Image.fromarray(images[i, 0]).resize((40, 40), Image.BICUBIC).save(root / "digits" / f"copy_{i}.jpg", quality=75)
        origin[f"copy_{i}.jpg"] = i
    for i in range(2):
        Image.fromarray(images[i, 0]).save(root / "digits" / f"again_{i}.png")
        origin[f"again_{i}.png"] = i
    return root, origin


def test_resized_and_recompressed_copies_join_their_originals_group(folder):
    root, origin = folder
    cfg = DataConfig(source="folder", path=str(root), train_size=8, heldout_size=2, resolution=16)
    images, _ = load_source(cfg)
    names = sorted(p.name for p in (root / "digits").iterdir())  # the loader's order: sorted paths
    assert len(images) == len(names)
    groups = near_duplicate_groups(images, 0.02)
    want = [origin[n] for n in names]
    same = np.equal.outer(groups.group, groups.group)
    assert np.array_equal(same, np.equal.outer(want, want))  # one group per original, nothing else merged
    exact = near_duplicate_groups(images, 0.0)
    assert exact.sizes.max() == 2 and len(exact.sizes) == 20 + 4  # exact copies only, without the threshold


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 12), min_size=4, max_size=40), st.integers(2, 5), st.integers(0, 3))
def test_every_group_lands_whole_in_one_shard_and_sizes_stay_within_its_largest_group(sizes, k, seed):
    groups = np.repeat(np.arange(len(sizes)), sizes)
    labels = np.random.default_rng(seed).integers(0, 3, len(groups))
    shard = split_shards(labels, k, seed, groups)
    for g in range(len(sizes)):
        assert len(set(shard[groups == g].tolist())) == 1
    totals = np.bincount(shard, minlength=k)
    if len(sizes) >= k:
        # greedy to the smallest shard: no shard exceeds another by more than the largest group
        assert totals.max() - totals.min() <= max(sizes)
    assert np.array_equal(shard, split_shards(labels, k, seed, groups))  # seeded


def test_msr_moves_a_group_whole():
    groups = np.array([0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9])
    shard = np.array([0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1])
    skip = np.zeros(12)
    skip[1] = 0.9  # one member of the group of three is skipped often
    losses = np.zeros((12, 2))
    losses[:, 1] = 1.0  # proxy 1 fits everything least
    new, moves = redistribute(shard, skip, losses, MSRConfig(skip_rate=0.5, max_imbalance=0.5), groups=groups)
    assert new[:3].tolist() == [1, 1, 1] and sorted(m["position"] for m in moves) == [0, 1, 2]
    plain, plain_moves = redistribute(shard, skip, losses, MSRConfig(skip_rate=0.5, max_imbalance=0.5))
    assert plain[:3].tolist() == [0, 1, 0] and len(plain_moves) == 1  # without groups: the sample alone
