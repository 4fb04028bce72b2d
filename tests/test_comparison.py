"""What the report derives from both evaluations: the checkpoints the curves are read from, the
skip rates it joins with the baseline's copies, and memorization at matched quality."""
import csv
import math

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from pipeline.train import rounds
from pipeline.compare.comparison import at_matched_quality, risk_table, skip_rates
from pipeline.core.config import parse_params
from pipeline.core.data import ImageSet
from pipeline.core.dedup import duplicate_groups
from pipeline.core.layout import Rounds

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_baseline_saves_k_checkpoints_a_round_in_training_order(tmp_path):
    p = parse_params({"data": {"train_size": 12, "resolution": 8},
                      "model": {"block_out_channels": [8, 16], "attention": False, "num_train_timesteps": 10},
                      "train": {"batch_size": 8, "warmup_share": 0.05, "threads": 1},
                      "eval": {"ddim_steps": 10},
                      "iet": {"shards": 3, "rounds": 2, "local_epochs": 4, "checkpoints_per_round": 3}})
    train = _random_train()
    plan = rounds.Plan.baseline(p)
    assert plan.checkpoints_per_round == 3 and plan.steps_per_round % 3 == 0
    rounds.run(p, plan, train, np.zeros(12, dtype=np.int64), tmp_path / "out", tmp_path / "rounds")
    points = Rounds(tmp_path / "rounds").checkpoints(p.iet.rounds)
    assert [x for x, _ in points] == pytest.approx([1 / 3, 2 / 3, 1, 4 / 3, 5 / 3, 2])
    assert [f.name for _, f in points[:3]] == ["checkpoint_01.safetensors", "checkpoint_02.safetensors",
                                                "aggregated.safetensors"]
    assert [f.parent for _, f in points] == [tmp_path / "rounds/round_1/aggregate"] * 3 + [
        tmp_path / "rounds/round_2/aggregate"] * 3
    from safetensors.torch import load_file
    states = [load_file(str(f))["conv_in.weight"] for _, f in points]
    assert all(not torch.equal(a, b) for a, b in zip(states, states[1:]))  # each a later state


def _random_train(n: int = 12) -> ImageSet:
    g = np.random.default_rng(0)
    return ImageSet(images=g.integers(0, 256, (n, 1, 8, 8), dtype=np.uint8), labels=np.arange(n) % 3, ids=np.arange(n))


def _iet_params(checkpoints_per_round: int):
    return parse_params({"data": {"train_size": 12, "resolution": 8},
                         "model": {"block_out_channels": [8, 16], "attention": False, "num_train_timesteps": 10},
                         "train": {"batch_size": 4, "warmup_share": 0.05, "threads": 1},
                         "agc": {"enabled": False}, "eval": {"ddim_steps": 10},
                         "iet": {"shards": 3, "rounds": 1, "local_epochs": 4,
                                 "checkpoints_per_round": checkpoints_per_round}})


def test_an_iet_mid_round_checkpoint_is_the_shard_weighted_average_and_changes_no_training(tmp_path):
    """The checkpoint halfway through a round equals the proxies trained half the round's steps by
    hand and averaged by shard size; the final weights are bit for bit those of a run without it."""
    from safetensors.torch import load_file

    from pipeline.train.ensemble import aggregate
    from pipeline.train.training import OneProxy, RoundCounts, train_steps

    train, shard = _random_train(), np.array([0] * 6 + [1] * 4 + [2] * 2)
    p = _iet_params(2)
    plan = rounds.Plan.iet(p)
    rounds.run(p, plan, train, shard, tmp_path / "two", tmp_path / "two/rounds")
    rounds.run(_iet_params(1), rounds.Plan.iet(_iet_params(1)), train, shard, tmp_path / "one", tmp_path / "one/rounds")
    final = [load_file(str(tmp_path / f"{name}/rounds/round_1/aggregate/aggregated.safetensors"))
             for name in ("two", "one")]
    assert all(torch.equal(final[0][k], final[1][k]) for k in final[0])
    assert not (tmp_path / "one/rounds/round_1/aggregate/checkpoint_01.safetensors").exists()
    assert not list((tmp_path / "one/rounds/round_1/train").glob("midpoint_*"))

    r = rounds.start(p, plan, train, shard, tmp_path / "hand", rounds.Hooks(), rounds.Ranks(device=torch.device("cpu")))
    steps = rounds.proxy_steps(3 * plan.steps_per_round, [6, 4, 2])
    for k, proxy in r.proxies.items():
        train_steps(OneProxy(k, proxy, p), r.images, {k: torch.from_numpy(np.flatnonzero(shard == k))},
                    round(steps[k] / 2), r.noise_schedule, p, r.mitigations, RoundCounts.zeros(12))
    by_hand = aggregate([r.proxies[k].model.state_dict() for k in range(3)], [6, 4, 2])
    mid = load_file(str(tmp_path / "two/rounds/round_1/aggregate/checkpoint_01.safetensors"))
    assert all(torch.equal(mid[k], by_hand[k]) for k in by_hand)
    assert not torch.equal(mid["conv_in.weight"], final[0]["conv_in.weight"])
    assert [x for x, _ in Rounds(tmp_path / "two/rounds").checkpoints(1)] == [0.5, 1.0]


def _complete_round(rounds_dir, r: int) -> None:
    """Round r's three folders, each holding the file that marks it done (pipeline/core/layout.py)."""
    folders = Rounds(rounds_dir)
    for folder in (folders.train(r), folders.aggregate(r), folders.profile(r)):
        folder.mkdir(parents=True, exist_ok=True)
    (folders.train(r) / "train.json").write_text("{}")
    save_file({"w": torch.zeros(1)}, str(folders.aggregate(r) / "aggregated.safetensors"))
    (folders.profile(r) / "round.json").write_text("{}")


def test_checkpoints_of_an_iet_run_are_its_rounds(tmp_path):
    for r in (1, 2):
        _complete_round(tmp_path, r)
    assert [x for x, _ in Rounds(tmp_path).checkpoints()] == [1.0, 2.0]
    assert [f for _, f in Rounds(tmp_path).checkpoints()] == [tmp_path / f"round_{r}/aggregate/aggregated.safetensors"
                                                              for r in (1, 2)]
    with pytest.raises(FileNotFoundError, match="re-run the training stage"):
        Rounds(tmp_path / "nothing").checkpoints()


def _loss_table(rounds_dir, r, rows):
    _complete_round(rounds_dir, r)
    path = Rounds(rounds_dir).profile(r) / "loss_table.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["sample_id", "drawn", "skip_rate"])
        w.writeheader()
        w.writerows(rows)


def test_skip_rates_average_the_rounds_a_sample_was_drawn_in(tmp_path):
    _loss_table(tmp_path, 1, [{"sample_id": 7, "drawn": 4, "skip_rate": 0.5},
                              {"sample_id": 9, "drawn": 0, "skip_rate": 0.0}])
    _loss_table(tmp_path, 2, [{"sample_id": 7, "drawn": 2, "skip_rate": 1.0},
                              {"sample_id": 9, "drawn": 0, "skip_rate": 0.0}])
    rate = skip_rates(tmp_path, np.array([9, 7]))
    assert math.isnan(rate[0]) and rate[1] == pytest.approx(0.75)


def test_risk_table_joins_duplicates_copies_and_skip_rates():
    images = np.zeros((4, 1, 2, 2), np.uint8)
    images[1] = images[3] = 5   # positions 1 and 3: one image stored twice
    images[2] = 9
    groups = duplicate_groups(images)            # groups: {0}, {1, 3}, {2}
    copied = [{"copies": 0, "loss": 0.3}, {"copies": 4, "loss": 0.1}, {"copies": 0, "loss": 0.2}]
    rows, summary = risk_table(groups, np.array([10, 11, 12, 13]), copied, np.array([0.1, 0.8, 0.0, 0.6]))
    assert [r["sample_id"] for r in rows] == [10, 11, 12]
    assert rows[1]["size"] == 2 and rows[1]["iet_skip_rate"] == pytest.approx(0.7)  # mean over both copies
    assert summary["risk_skip_auc"] == 1.0 and summary["risk_loss_auc"] == 1.0  # the copied one ranks first
    assert summary["skip_rate_duplicated"] == pytest.approx(0.7)
    assert summary["skip_rate_unique"] == pytest.approx(0.05)


def test_a_model_is_matched_at_its_last_curve_point():
    baseline = [{"round": 1, "fd": 10.0, "mem_ratio": 0.0, "mean_nn1": 6.0},
                {"round": 2, "fd": 4.0, "mem_ratio": 0.2, "mean_nn1": 4.0},
                {"round": 3, "fd": 2.0, "mem_ratio": 0.6, "mean_nn1": 2.0}]
    iet = [{"round": 1, "fd": 12.0, "mem_ratio": 0.0, "mean_nn1": 7.0},
           {"round": 2, "fd": 7.0, "mem_ratio": 0.05, "mean_nn1": 5.5}]
    out = at_matched_quality(baseline, iet)
    # FD 7 lies halfway between the baseline's rounds 1 and 2: memorization 0.1, NN1 5.0 there
    assert out["baseline_mem_at_matched_quality"] == pytest.approx(0.1)
    assert out["mem_at_matched_quality"] == pytest.approx(-0.05)
    assert out["nn1_at_matched_quality"] == pytest.approx(0.5)
    assert at_matched_quality(baseline, [{"round": 1, "fd": 1.0, "mem_ratio": 0.0, "mean_nn1": 1.0}])[
        "matched_quality_status"] == "out_of_range_better"
