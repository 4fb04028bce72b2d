"""Reference weights of tiny runs: a refactor of the trainer, the round loop or a mitigation must
leave the final weights (model and EMA) where tests/pinned/<run>.safetensors has them. The IET-AGC+
run skips samples (AGC), raises TAA strengths and moves samples (MSR) in its last round, so every
part of the method is covered.

Tolerance. Float kernels follow the instruction set (and the thread count), so the same run gives
weights that differ in their last bits from one CPU to another; a bit-exact hash held only on the
machine that wrote it (a CPU without AVX-512 failed all three). The check is the mean absolute
difference over every weight of the model and of its EMA, against TOLERANCE = 2e-5.
Measured on one machine (2026-12-01, torch 2.13.0+cpu), mean absolute difference from the reference:
  - the same run with 2 threads instead of 1 (other reduction order, the effect another CPU has):
    7.4e-7 baseline, 2.9e-7 IET-AGC+, 3.3e-7 grad-accum -- at least 27x below the tolerance;
  - a real change, noise and timesteps drawn in swapped order: 1.4e-3, 4.6e-4, 4.6e-4 -- at least
    23x above it; test_a_real_change_fails_the_comparison trains the baseline on negated noise.
What the tolerance cannot see: changes that Adam's scale invariance absorbs (grad clip at 0.9
instead of 1.0 moved the weights by 2e-7 to 8e-7), as no comparison of final weights can.
Bit-exactness stays where it is a promise on one machine: resume, several processes, stacked
proxies compare two runs made here (tests/test_resume.py, test_distributed.py, test_stacked.py).

A deliberate change of behaviour rewrites the references in a commit of its own, saying why:
`python tests/test_pinned.py --write`. History: train.warmup_share replaced train.warmup_steps
(docs/method.md#small-scale: warmup the same share of every model's steps); at 0.04 the baseline keeps its 2 warmup
steps and is unchanged, each proxy warms up 1 step of its 18 instead of 2 (IET-AGC+ references moved
by 3.6e-5 mean absolute difference, 1.8x the tolerance). Then a round became epochs of each shard
as it is (docs/method.md#small-scale): batches of distinct samples from successive permutations (drop_last), each
proxy's steps its shard's share of the baseline's; batch 4 instead of 8, since with drop_last a
batch of 8 is each 4-image shard whole and AGC no longer skipped enough for MSR to move anything.
On the new references (2026-12-02): 2 threads instead of 1 now give the same bits (batches of 4
split no reduction), so the thread margin above is the last measured one; negated noise moves them
by 1.8e-3, 7.7e-4, 7.7e-4 (at least 38x the tolerance)."""
from __future__ import annotations

import copy
import csv
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from pipeline.train import rounds
from pipeline.core.config import parse_params
from pipeline.core.data import ImageSet
from pipeline.train.ensemble import split_shards

pytestmark = pytest.mark.usefixtures("one_thread")

REFERENCES = Path(__file__).parent / "pinned"
RUNS = ("baseline", "iet", "iet_accum")
TOLERANCE = 2e-5  # mean absolute weight difference; the module docstring gives the measured margins
TINY = {"data": {"train_size": 12, "resolution": 8, "duplicates": {"images": 0, "copies": 16, "near": False}},
        "model": {"block_out_channels": [8, 16], "attention": False, "num_train_timesteps": 10},
        "eval": {"ddim_steps": 10},  # DDIM cannot take more steps than the training timesteps
        "train": {"batch_size": 4, "lr": 2e-4, "warmup_share": 0.04, "grad_clip": 1.0, "ema_decay": 0.999, "threads": 1,
                  "device": "cpu"},  # the references are CPU draws
        "iet": {"shards": 3, "rounds": 3, "local_epochs": 12, "checkpoints_per_round": 2},
        "agc": {"tau": 0.9, "bank_decay": 0.8},
        "taa": {"rise": 0.5, "margin": 0.1, "decay": 0.9, "max_shift": 2, "flip": False, "jitter": 0.1},
        "msr": {"skip_rate": 0.2, "max_imbalance": 0.5, "profile_timesteps": 2, "fraction": None}}
# every value the weights depend on is spelled out: a change of a built-in default must not move them


def final_weights(name: str, work: Path) -> dict[str, torch.Tensor]:
    """Train the tiny run `name` under `work`; its final weights, keyed `model/...` and `model_ema/...`."""
    raw = copy.deepcopy(TINY)
    raw["train"]["grad_accum"] = 2 if name == "iet_accum" else 1
    p = parse_params(raw)
    g = np.random.default_rng(0)
    train = ImageSet(images=g.integers(0, 256, (12, 1, 8, 8), dtype=np.uint8),
                     labels=np.arange(12) % 3, ids=np.arange(100, 112))
    plan = rounds.Plan.baseline(p) if name == "baseline" else rounds.Plan.iet(p)
    rounds.run(p, plan, train, split_shards(train.labels, 3, 0), work / "out", work / "rounds")
    if name != "baseline":  # the run exercises what it claims to
        with open(work / "rounds/round_3/profile/moves.csv") as f:
            assert len(list(csv.DictReader(f))) > 0
    return {f"{folder}/{key}": value for folder in ("model", "model_ema")
            for key, value in load_file(str(work / "out" / folder / "unet/diffusion_pytorch_model.safetensors")).items()}


def mean_difference(got: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> float:
    assert got.keys() == reference.keys()
    total = sum(float((got[k].double() - reference[k].double()).abs().sum()) for k in reference)
    return total / sum(t.numel() for t in reference.values())


@pytest.mark.parametrize("name", RUNS)
def test_final_weights_match_the_reference(name, tmp_path):
    difference = mean_difference(final_weights(name, tmp_path), load_file(str(REFERENCES / f"{name}.safetensors")))
    assert difference < TOLERANCE, f"{name}: mean |weight - reference| = {difference:.3g}"


def test_a_real_change_fails_the_comparison(tmp_path, monkeypatch):
    """The tolerance is tight enough to see a real change: the baseline trained on the negated noise
    of every draw (an equally valid run, other draws), as a swapped draw order would give."""
    real = torch.randn
    monkeypatch.setattr(torch, "randn", lambda *args, **kwargs: -real(*args, **kwargs))
    difference = mean_difference(final_weights("baseline", tmp_path), load_file(str(REFERENCES / "baseline.safetensors")))
    assert difference > 10 * TOLERANCE, f"mean |weight - reference| = {difference:.3g}"


if __name__ == "__main__" and sys.argv[1:] == ["--write"]:
    torch.set_num_threads(1)
    REFERENCES.mkdir(exist_ok=True)
    for run in RUNS:
        with tempfile.TemporaryDirectory() as work:
            save_file(final_weights(run, Path(work)), str(REFERENCES / f"{run}.safetensors"))
        print(f"wrote {REFERENCES / run}.safetensors")
