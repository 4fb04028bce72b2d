"""What the report derives from both evaluations: the checkpoints the curves are read from, the
skip rates it joins with the baseline's copies, and memorization at matched quality."""
import csv
import math

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from pipeline import rounds
from pipeline.comparison import at_matched_quality, risk_table, skip_rates
from pipeline.config import parse_params
from pipeline.data import ImageSet
from pipeline.dedup import duplicate_groups
from pipeline.evaluation import checkpoints

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_baseline_saves_k_checkpoints_a_round_in_training_order(tmp_path):
    p = parse_params({"data": {"train_size": 12, "resolution": 8},
                      "model": {"block_out_channels": [8, 16], "attention": False, "num_train_timesteps": 10},
                      "train": {"batch_size": 8, "warmup_share": 0.05, "threads": 1},
                      "eval": {"ddim_steps": 10}, "iet": {"shards": 3, "rounds": 2, "local_epochs": 4}})
    g = np.random.default_rng(0)
    train = ImageSet(images=g.integers(0, 256, (12, 1, 8, 8), dtype=np.uint8), labels=np.arange(12) % 3,
                     ids=np.arange(12))
    plan = rounds.Plan.baseline(p)
    assert plan.checkpoints_per_round == 3 and plan.steps_per_round % 3 == 0
    rounds.run(p, plan, train, np.zeros(12, dtype=np.int64), tmp_path / "out", tmp_path / "state")
    points = checkpoints(tmp_path / "out/rounds")
    assert [x for x, _ in points] == pytest.approx([1 / 3, 2 / 3, 1, 4 / 3, 5 / 3, 2])
    assert [f.name for _, f in points[:3]] == ["checkpoint_01.safetensors", "checkpoint_02.safetensors",
                                                "aggregated.safetensors"]
    from safetensors.torch import load_file
    states = [load_file(str(f))["conv_in.weight"] for _, f in points]
    assert all(not torch.equal(a, b) for a, b in zip(states, states[1:]))  # each a later state


def test_checkpoints_of_an_iet_run_are_its_rounds(tmp_path):
    for r in range(2):
        (tmp_path / f"round_{r:02d}").mkdir()
        save_file({"w": torch.zeros(1)}, str(tmp_path / f"round_{r:02d}/aggregated.safetensors"))
    assert [x for x, _ in checkpoints(tmp_path)] == [1.0, 2.0]
    with pytest.raises(FileNotFoundError, match="re-run the training stage"):
        checkpoints(tmp_path / "nothing")


def _loss_table(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["sample_id", "drawn", "skip_rate"])
        w.writeheader()
        w.writerows(rows)


def test_skip_rates_average_the_rounds_a_sample_was_drawn_in(tmp_path):
    _loss_table(tmp_path / "round_00/loss_table.csv", [{"sample_id": 7, "drawn": 4, "skip_rate": 0.5},
                                                       {"sample_id": 9, "drawn": 0, "skip_rate": 0.0}])
    _loss_table(tmp_path / "round_01/loss_table.csv", [{"sample_id": 7, "drawn": 2, "skip_rate": 1.0},
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
