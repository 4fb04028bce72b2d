import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from pipeline.train import ensemble, loss_table
from pipeline.mitigation import msr
from pipeline.core.config import MSRConfig


def test_aggregate_is_the_shard_size_weighted_mean():
    g = torch.Generator().manual_seed(0)
    states = [{"w": torch.randn(3, 4, generator=g), "b": torch.randn(4, generator=g),
               "count": torch.tensor(7)} for _ in range(3)]
    sizes = [10, 30, 60]
    avg = ensemble.aggregate(states, sizes)
    for key in ("w", "b"):
        expected = sum(s[key].double() * n for s, n in zip(states, sizes)) / sum(sizes)
        torch.testing.assert_close(avg[key], expected.float())
    assert avg["count"].item() == 7
    # equal weights reduce to the plain mean; a single proxy to itself
    torch.testing.assert_close(ensemble.aggregate(states, [1, 1, 1])["w"], torch.stack([s["w"] for s in states]).mean(0))
    torch.testing.assert_close(ensemble.aggregate(states[:1], [5])["w"], states[0]["w"])


def test_split_is_class_balanced_seeded_and_complete():
    labels = np.repeat(np.arange(10), 13)
    shard = ensemble.split_shards(labels, 4, seed=0)
    sizes = np.bincount(shard, minlength=4)
    assert sizes.sum() == len(labels) and sizes.max() - sizes.min() <= 1
    for c in range(10):
        per = np.bincount(shard[labels == c], minlength=4)
        assert per.max() - per.min() <= 1
    assert np.array_equal(shard, ensemble.split_shards(labels, 4, seed=0))
    assert not np.array_equal(shard, ensemble.split_shards(labels, 4, seed=1))


def test_moves_go_to_the_proxy_with_the_highest_loss():
    shard = np.array([0, 0, 0, 1, 1, 1])
    skip = np.array([0.9, 0.1, 0.0, 0.0, 0.8, 0.0])
    losses = np.array([[0.1, 0.5], [0.1, 0.9], [0.1, 0.2], [0.1, 0.2], [0.7, 0.3], [0.1, 0.1]])
    new, moves = msr.redistribute(shard, skip, losses, MSRConfig(skip_rate=0.5, max_imbalance=0.5))
    assert [(m["position"], m["from"], m["to"]) for m in moves] == [(0, 0, 1), (4, 1, 0)]
    assert new.tolist() == [1, 0, 0, 1, 0, 1]


def test_a_sample_whose_own_proxy_fits_it_worst_stays():
    shard = np.array([0, 0, 1, 1])
    losses = np.array([[0.9, 0.1], [0.1, 0.1], [0.1, 0.1], [0.1, 0.1]])
    new, moves = msr.redistribute(shard, np.array([1.0, 0, 0, 0]), losses, MSRConfig(skip_rate=0.5, max_imbalance=1.0))
    assert moves == [] and np.array_equal(new, shard)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(4, 80), k=st.integers(2, 6), rounds=st.integers(1, 5), seed=st.integers(0, 10_000),
       imbalance=st.floats(0, 1), fraction=st.one_of(st.none(), st.floats(0.01, 1)))
def test_redistribution_loses_and_duplicates_nothing_and_respects_bounds(n, k, rounds, seed, imbalance, fraction):
    k = min(k, n)
    cfg = MSRConfig(skip_rate=0.3, fraction=fraction, max_imbalance=imbalance)
    rng = np.random.default_rng(seed)
    shard = ensemble.split_shards(rng.integers(0, 3, n), k, seed)
    lo, hi = msr.size_bounds(n, k, imbalance)
    for _ in range(rounds):
        skip, losses = rng.random(n), rng.random((n, k))
        before = np.bincount(shard, minlength=k)
        new, moves = msr.redistribute(shard, skip, losses, cfg)
        again, moves_again = msr.redistribute(shard, skip, losses, cfg)
        assert np.array_equal(new, again) and moves == moves_again  # same input -> same moves
        # every sample in exactly one shard; a shard only shrinks to lo / grows to hi by moving
        assert new.shape == (n,) and new.min() >= 0 and new.max() < k
        sizes = np.bincount(new, minlength=k)
        assert sizes.sum() == n
        assert np.all((sizes <= np.maximum(hi, before)) & (sizes >= np.minimum(lo, before)))
        assert len(moves) == int((new != shard).sum())
        shard = new


@settings(max_examples=60, deadline=None)
@given(n=st.integers(4, 60), k=st.integers(2, 6), seed=st.integers(0, 10_000), imbalance=st.floats(0, 1),
       fraction=st.one_of(st.none(), st.floats(0.01, 1)))
def test_scoring_on_demand_reads_exactly_the_rows_redistribution_needs(n, k, seed, imbalance, fraction):
    k = min(k, n)
    cfg = MSRConfig(skip_rate=0.3, fraction=fraction, max_imbalance=imbalance)
    rng = np.random.default_rng(seed)
    shard = ensemble.split_shards(rng.integers(0, 3, n), k, seed)
    skip, full = rng.random(n), rng.random((n, k))
    full[rng.random((n, k)) < 0.2] = 0.5  # ties between proxies
    own_only = np.full((n, k), np.nan)
    own_only[np.arange(n), shard] = full[np.arange(n), shard]

    def recorder(calls):
        def score(positions):
            calls.append(positions.tolist())
            return full[positions]
        return score

    exact_calls, batched_calls = [], []
    lazy, lazy_moves = msr.redistribute(shard, skip, own_only.copy(), cfg, score=recorder(exact_calls))
    eager, eager_moves = msr.redistribute(shard, skip, full, cfg)
    assert np.array_equal(lazy, eager) and lazy_moves == eager_moves
    requested = [i for c in exact_calls for i in c]
    assert len(requested) == len(set(requested))  # no row scored twice
    known = own_only.copy()
    known[requested] = full[requested]
    msr.redistribute(shard, skip, known, cfg)  # every row read was scored (else: ValueError)
    for i in requested:  # and every row scored is read
        missing = known.copy()
        missing[i, np.arange(k) != shard[i]] = np.nan
        with pytest.raises(ValueError):
            msr.redistribute(shard, skip, missing, cfg)
    # in batches of at least 8 rows: the same decisions from a superset of rows, in no more calls
    batched, batched_moves = msr.redistribute(shard, skip, own_only.copy(), cfg, score=recorder(batched_calls),
                                                   score_at_least=8)
    assert np.array_equal(batched, eager) and batched_moves == eager_moves
    rows = [i for c in batched_calls for i in c]
    assert len(rows) == len(set(rows)) and set(rows) >= set(requested)
    assert len(batched_calls) <= len(exact_calls)


def test_profile_draws_depend_only_on_the_sample_so_any_subset_scores_the_same():
    from pipeline.core.config import ModelConfig
    from pipeline.core.models import build_scheduler, build_unet
    cfg = ModelConfig(block_out_channels=(8, 16), attention=False, num_train_timesteps=100)
    sched = build_scheduler(cfg)
    n = loss_table.PROFILE_CHUNK + 20  # two generator chunks
    images = torch.rand(n, 1, 8, 8) * 2 - 1
    model = build_unet(cfg, 8, 1, seed=0)
    everything = loss_table.profile_losses(model, images, np.arange(n), sched, pairs=3, seed=5)
    subset = np.array([n - 1, 3, loss_table.PROFILE_CHUNK, 7])
    part = loss_table.profile_losses(model, images, subset, sched, pairs=3, seed=5, batch_size=5)
    torch.testing.assert_close(part, everything[subset])
    assert everything.shape == (n,) and torch.all(everything > 0)
    other_seed = loss_table.profile_losses(model, images, subset, sched, pairs=3, seed=6)
    assert not torch.allclose(part, other_seed)


def test_candidates_are_the_most_skipped_first():
    skip = np.array([0.2, 0.9, 0.5, 0.9, 0.0])
    assert msr.msr_candidates(skip, MSRConfig(skip_rate=0.5)).tolist() == [1, 3, 2]
    assert msr.msr_candidates(skip, MSRConfig(fraction=0.4)).tolist() == [1, 3]
