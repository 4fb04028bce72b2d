"""The dedup variant (pipeline/mitigation/dedup.py): each duplicate group trained on once, with the
run's optimizer steps, reported like every other variant."""
import csv

import numpy as np
import pytest
import torch

from pipeline import mitigation

from pipeline.train import rounds
from pipeline.core.config import parse_params
from pipeline.core.data import ImageSet
from pipeline.mitigation import Mitigations

pytestmark = pytest.mark.usefixtures("one_thread")


def _params(**groups):
    return parse_params({"data": {"train_size": 12, "resolution": 8, "duplicates": {"images": 0}},
                         "model": {"block_out_channels": [8, 16], "attention": False, "num_train_timesteps": 10},
                         "train": {"batch_size": 4, "threads": 1}, "eval": {"ddim_steps": 10},
                         "agc": {"enabled": False}, "dedup": {"enabled": True}, **groups})


def _with_copies() -> ImageSet:
    """12 images: image 0 stored 4 times (positions 0, 3, 6, 9), image 1 twice (1, 10)."""
    g = np.random.default_rng(0)
    images = g.integers(0, 256, (12, 1, 8, 8), dtype=np.uint8)
    images[[3, 6, 9]] = images[0]
    images[10] = images[1]
    return ImageSet(images=images, labels=np.arange(12) % 3, ids=np.arange(100, 112))


def test_dedup_keeps_one_position_per_group_and_the_run_keeps_its_steps():
    train, p = _with_copies(), _params(iet={"shards": 1})
    hooks = Mitigations(("dedup",), p, 12, (0,), images=train.images)
    assert hooks.members(0, torch.arange(12)).tolist() == [0, 1, 2, 4, 5, 7, 8, 11]
    assert hooks.members(0, torch.tensor([3, 6, 9, 10])).tolist() == []  # a shard holding only later copies
    assert hooks.summary() == {"dedup_removed": 4}
    plan = rounds.Plan.iet(p)
    assert plan.mitigations == ("dedup",) and plan.variant == "dedup"
    assert plan.steps_per_round * plan.shards == rounds.Plan.baseline(p).steps_per_round  # the same optimizer steps
    assert "dedup" in mitigation.REGISTRY


def test_a_dedup_run_never_draws_a_later_copy(tmp_path):
    train, p = _with_copies(), _params(iet={"shards": 2, "rounds": 1, "local_epochs": 4})
    shard = np.arange(12) % 2
    rounds.run(p, rounds.Plan.iet(p), train, shard, tmp_path / "out", tmp_path / "rounds")
    with open(tmp_path / "rounds/round_1/profile/loss_table.csv") as f:
        drawn = {int(row["sample_id"]) - 100: int(row["drawn"]) for row in csv.DictReader(f)}
    assert [i for i, n in drawn.items() if n == 0] == [3, 6, 9, 10]
    assert all(drawn[i] > 0 for i in (0, 1, 2, 4, 5, 7, 8, 11))
