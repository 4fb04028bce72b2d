"""The round loop on tiny params: fair budget, determinism, resume after a kill, artifacts."""
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from pipeline.train import rounds
from pipeline.core.config import parse_params
from pipeline.core.data import ImageSet
from pipeline.train.ensemble import split_shards
from pipeline.core.layout import Rounds
from tiny import tiny

TINY = tiny(model={'num_train_timesteps': 50}, iet={'local_epochs': 4}, msr={'skip_rate': 0.2, 'max_imbalance': 0.5, 'profile_timesteps': 2})


@pytest.fixture
def tiny():
    p = parse_params(TINY)
    g = np.random.default_rng(0)
    train = ImageSet(images=g.integers(0, 256, (12, 1, 8, 8), dtype=np.uint8),
                     labels=np.arange(12) % 3, ids=np.arange(100, 112))
    return p, train, split_shards(train.labels, 3, 0)


def test_baseline_gets_the_same_steps_times_batch_as_all_proxies(tiny):
    p, _, _ = tiny
    iet, base = rounds.Plan.iet(p), rounds.Plan.baseline(p)
    assert base.shards == 1 and base.mitigations == () and iet.mitigations == ("agc", "msr", "taa")
    assert iet.shards * iet.rounds * iet.steps_per_round == base.shards * base.rounds * base.steps_per_round
    assert iet.steps_per_round == 2  # 4 epochs x ceil(12/3) images / batch 8


def test_round_loop_writes_artifacts_and_is_deterministic(tiny, tmp_path):
    p, train, shard = tiny
    plan = rounds.Plan.iet(p)
    a = rounds.run(p, plan, train, shard, tmp_path / "a", tmp_path / "a/rounds")
    rounds.run(p, plan, train, shard, tmp_path / "b", tmp_path / "b/rounds")
    wa = load_file(str(tmp_path / "a/model/unet/diffusion_pytorch_model.safetensors"))
    wb = load_file(str(tmp_path / "b/model/unet/diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert a["images_seen"] == 3 * 2 * 2 * 8
    folders = Rounds(tmp_path / "a/rounds")
    for r in range(2):
        d = folders.profile(r + 1)
        table = np.genfromtxt(d / "loss_table.csv", delimiter=",", names=True)
        assert sorted(table["sample_id"].astype(int)) == list(range(100, 112))
        # every drawn image counted once: each proxy its steps, each a batch of 8 or its shard whole
        sizes = np.bincount(table["shard"].astype(int), minlength=3)
        steps = rounds.proxy_steps(3 * plan.steps_per_round, sizes.tolist())
        assert table["drawn"].sum() == sum(s * min(8, n) for s, n in zip(steps, sizes))
        shards = np.genfromtxt(d / "shards.csv", delimiter=",", names=True)
        assert sorted(shards["sample_id"].astype(int)) == list(range(100, 112))
        # the aggregated checkpoint is the size-weighted mean of the saved proxies
        sizes = np.bincount(np.genfromtxt(folders.profile(r) / "shards.csv", delimiter=",",
                                          names=True)["shard"].astype(int) if r else shard, minlength=3)
        proxies = [load_file(str(folders.train(r + 1) / f"proxy_{k}.safetensors")) for k in range(3)]
        agg = load_file(str(folders.aggregate(r + 1) / "aggregated.safetensors"))
        key = "conv_in.weight"
        expected = sum(pr[f"model.{key}"].double() * n for pr, n in zip(proxies, sizes)) / sizes.sum()
        torch.testing.assert_close(agg[key], expected.float())
    # the rounds folder is kept after a complete run (it is the record): both rounds, whole, and nothing else
    assert folders.complete() == 2 and sorted(d.name for d in folders.root.iterdir()) == ["round_1", "round_2"]


def test_resume_after_an_interruption_gives_the_same_weights(tiny, tmp_path):
    p, train, shard = tiny
    plan = rounds.Plan.iet(p)
    rounds.run(p, plan, train, shard, tmp_path / "full", tmp_path / "full/rounds")

    class KillAfterSave(rounds.Hooks):
        def proxy_round(self, rnd, proxy, curve):
            if rnd == 1:
                raise KeyboardInterrupt  # mid round 1: round 0 complete and saved

    with pytest.raises(KeyboardInterrupt):
        rounds.run(p, plan, train, shard, tmp_path / "cut", tmp_path / "cut/rounds", hooks=KillAfterSave())
    cut = Rounds(tmp_path / "cut/rounds")
    assert cut.complete() == 1 and not cut.round(2).exists()  # round 0 (round_1) saved, nothing of round 1
    assert json.loads((cut.train(1) / "train.json").read_text())["round"] == 1
    rounds.run(p, plan, train, shard, tmp_path / "cut", tmp_path / "cut/rounds")
    assert cut.complete() == 2
    wa = load_file(str(tmp_path / "full/model/unet/diffusion_pytorch_model.safetensors"))
    wb = load_file(str(tmp_path / "cut/model/unet/diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_loss_table_scores_own_proxy_always_and_others_only_where_redistribution_reads(tiny, tmp_path):
    p, train, shard = tiny
    tables, per_proxy, moves = {}, {}, {}
    for mode in ("candidates", "all"):
        q = p.model_copy(update={"iet": p.iet.model_copy(update={"rounds": 1}),
                                 "msr": p.msr.model_copy(update={"profile": mode, "fraction": 0.75})})
        rounds.run(q, rounds.Plan.iet(q), train, shard, tmp_path / mode, tmp_path / mode / "rounds")
        table = tables[mode] = np.genfromtxt(tmp_path / mode / "rounds/round_1/profile/loss_table.csv", delimiter=",",
                                             names=True)
        per_proxy[mode] = np.stack([table[f"loss_proxy_{k}"] for k in range(3)], axis=1)
        moves[mode] = np.genfromtxt(tmp_path / mode / "rounds/round_1/profile/moves.csv", delimiter=",", names=True,
                                    usecols=(0, 1, 2), dtype=int, ndmin=1)
    assert np.all(np.isfinite(per_proxy["all"]))
    assert moves["candidates"].size > 0
    # scoring on demand decides exactly what scoring everything decides
    np.testing.assert_array_equal(moves["candidates"], moves["all"])
    lazy, table = per_proxy["candidates"], tables["candidates"]
    scored = np.isfinite(lazy)
    np.testing.assert_allclose(lazy[scored], per_proxy["all"][scored], rtol=1e-5)
    own = lazy[np.arange(12), table["shard"].astype(int)]
    np.testing.assert_array_equal(own, table["loss_own"])
    assert np.all(np.isfinite(own) & (own > 0))
    elsewhere = scored.sum(axis=1) > 1
    candidate = np.zeros(12, dtype=bool)
    candidate[np.lexsort((np.arange(12), -table["skip_rate"]))[:9]] = True  # the top 75% by skip rate
    assert not np.any(elsewhere & ~candidate)  # only candidates are scored under other proxies...
    assert np.all(elsewhere[np.isin(train.ids, moves["candidates"]["sample_id"])])  # ...every moved one is
    assert np.all(scored[elsewhere])  # under all K proxies: nothing half-scored
