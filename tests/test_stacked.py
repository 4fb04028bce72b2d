"""train.stack_proxies: a process's proxies in one vmapped step give the one-after-another weights
up to float rounding, with the same AGC masks, TAA strengths and MSR moves; resume still works."""
import copy
import csv

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from pipeline.train import rounds, stacked
from pipeline.core.config import ConfigError, parse_params
from pipeline.core.data import ImageSet
from pipeline.train.ensemble import split_shards
from pipeline.core.layout import Rounds
from test_pinned import TINY
from tiny import Stop, stop_after_round

pytestmark = pytest.mark.usefixtures("one_thread")


def _run(tmp_path, stack: str, hooks=None, **groups):
    raw = copy.deepcopy(TINY)
    raw["train"]["stack_proxies"] = stack
    for group, values in groups.items():
        raw.setdefault(group, {}).update(values)
    p = parse_params(raw)
    g = np.random.default_rng(0)
    train = ImageSet(images=g.integers(0, 256, (12, 1, 8, 8), dtype=np.uint8), labels=np.arange(12) % 3,
                     ids=np.arange(100, 112))
    rounds.run(p, rounds.Plan.iet(p), train, split_shards(train.labels, 3, 0), tmp_path / "out", tmp_path / "rounds",
               hooks=hooks)
    weights = load_file(str(tmp_path / "out/model/unet/diffusion_pytorch_model.safetensors"))
    moves = []
    folders = Rounds(tmp_path / "rounds")
    for r in range(1, folders.complete() + 1):
        with open(folders.profile(r) / "moves.csv") as f:
            moves += [(r, row["sample_id"]) for row in csv.DictReader(f)]
    with open(tmp_path / "out/curves.csv") as f:
        curve = [(row["proxy"], row["step"], round(float(row["kept"]), 3)) for row in csv.DictReader(f)]
    return p, torch.cat([w.flatten() for _, w in sorted(weights.items())]), moves, curve


def test_stacked_proxies_give_the_sequential_weights_masks_and_moves(tmp_path):
    """IET-AGC+ with every part acting (the pinned run: AGC skips, TAA rises, MSR moves), 18 steps a
    proxy. Tolerance: the batched kernels sum in another order, so gradients differ in their last
    bits; Adam moves a weight by about lr a step whatever its gradient's size, so a weight whose
    gradient is near 0 can step the other way: no weight may differ by more than 3 Adam steps
    (3 x lr), and the mean difference must stay below 1e-5 (measured: 1.1 lr and 2e-7; a wrong
    gradient, clip or Adam state moves many weights by ~lr every step, and another seed gives a mean
    difference of 0.065)."""
    p, sequential, seq_moves, seq_curve = _run(tmp_path / "seq", "false")
    _, together, moves, curve = _run(tmp_path / "stacked", "true")
    diff = (sequential - together).abs()
    assert diff.max() <= 3 * p.train.lr and diff.mean() < 1e-5
    assert moves == seq_moves and len(moves) > 0  # MSR moved the same samples
    assert curve == seq_curve  # AGC kept the same fractions at every logged step, proxy by proxy
    _, other_seed, _, _ = _run(tmp_path / "seed1", "false", seeds={"train": 1})
    assert (sequential - other_seed).abs().mean() > 1000 * diff.mean()  # the tolerance tells runs apart


def test_a_stacked_run_resumes_bit_for_bit(tmp_path):
    with pytest.raises(Stop):
        _run(tmp_path / "resumed", "true", hooks=stop_after_round(0))
    assert Rounds(tmp_path / "resumed/rounds").complete() == 1
    _, resumed, _, _ = _run(tmp_path / "resumed", "true")  # from round 1's start, as saved after round 0
    _, straight, _, _ = _run(tmp_path / "straight", "true")
    assert torch.equal(resumed, straight)


def test_vmap_group_norm_is_group_norm():
    norm = torch.nn.GroupNorm(4, 16)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-1, 1)
    x = torch.randn(3, 16, 5, 5) * 3 + 1
    torch.testing.assert_close(stacked.VmapGroupNorm(norm)(x), norm(x), rtol=1e-5, atol=1e-5)


def test_each_proxy_is_clipped_by_its_own_norm():
    """_clip_each equals torch's clip_grad_norm_ applied to each proxy's gradients on their own."""
    grads = {"a": torch.randn(3, 4, 5), "b": torch.randn(3, 7) * torch.tensor([[0.01], [1.0], [100.0]])}
    params = {n: torch.zeros_like(g, requires_grad=True) for n, g in grads.items()}
    for n, g in grads.items():
        params[n].grad = g.clone()
    stacked._clip_each([params["a"].grad, params["b"].grad], 1.0)
    for j in range(3):
        own = [torch.zeros_like(grads[n][j], requires_grad=True) for n in ("a", "b")]
        for p, n in zip(own, ("a", "b")):
            p.grad = grads[n][j].clone()
        torch.nn.utils.clip_grad_norm_(own, 1.0)
        for p, n in zip(own, ("a", "b")):
            torch.testing.assert_close(params[n].grad[j], p.grad)


@pytest.mark.parametrize("override", [{"dp": {"enabled": True}, "iet": {"shards": 1}, "agc": {"enabled": False},
                                       "train": {"batch_size": 4}},
                                      {"train": {"mixed_precision": "fp16"}}, {"train": {"grad_accum": 2}}])
def test_stacking_what_it_cannot_is_refused_naming_the_key(override):
    raw = copy.deepcopy(TINY)
    raw["train"]["stack_proxies"] = True  # as YAML reads `true`
    for group, values in override.items():
        raw.setdefault(group, {}).update(values)
    with pytest.raises(ConfigError, match="train.stack_proxies"):
        parse_params(raw)
    raw["train"]["stack_proxies"] = "auto"
    assert not stacked.wanted(parse_params(raw), torch.device("cuda"), 4)  # auto falls back


def test_auto_stacks_on_cuda_only_and_never_one_proxy():
    p = parse_params(copy.deepcopy(TINY))
    assert p.train.stack_proxies == "auto"
    assert stacked.wanted(p, torch.device("cuda"), 3) and not stacked.wanted(p, torch.device("cpu"), 3)
    assert not stacked.wanted(p, torch.device("cuda"), 1)
