"""The tiny run the tests train, in one place: an 8x8 UNet of widths (8, 16) without attention and
10 timesteps (AGC's per-timestep banks fill within a few steps), K=3 shards. A test states only
what it changes: `tiny(iet={"rounds": 1})` is the base with that one key replaced."""
from __future__ import annotations

import copy

ARCH = {"block_out_channels": [8, 16], "attention": False, "num_train_timesteps": 10}
BASE = {"data": {"train_size": 12, "resolution": 8},
        "model": ARCH,
        "train": {"batch_size": 8, "warmup_steps": 2, "threads": 1},
        "eval": {"ddim_steps": 10},
        "iet": {"shards": 3, "rounds": 2, "local_epochs": 6}}


def tiny(**groups: dict) -> dict:
    """A fresh copy of BASE with each given group's keys replaced (other keys of the group kept)."""
    out = copy.deepcopy(BASE)
    for group, values in groups.items():
        out.setdefault(group, {}).update(copy.deepcopy(values))
    return out


def arch(**changes):
    """The tiny architecture as a ModelConfig."""
    from pipeline.config import ModelConfig

    return ModelConfig(**{**ARCH, **changes})
