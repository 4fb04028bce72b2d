"""DP-SGD through Opacus (dp.*): a private step is a plain step when neither clipping nor noise acts,
it clips each sample's gradient, a tiny run reports its epsilon, and what DP cannot be combined with
is refused with one line naming the key."""
import json
import math

import numpy as np
import pytest
import torch

from pipeline import mitigation

from pipeline.train import rounds
from pipeline.core.config import ConfigError, parse_params
from pipeline.core.data import ImageSet
from pipeline.mitigation.dp import epsilon, make_private
from pipeline.core.models import build_scheduler, build_unet
from pipeline.core.checkpoint import load_proxy, save_proxy
from pipeline.train.training import backward, new_proxy, update

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {"data": {"train_size": 16, "resolution": 8, "duplicates": {"images": 0, "copies": 16, "near": False}},
        "model": {"block_out_channels": [8, 16], "attention": False, "num_train_timesteps": 10},
        "eval": {"ddim_steps": 10},
        "train": {"batch_size": 8, "warmup_share": 0.05, "threads": 1, "device": "cpu"},
        "iet": {"shards": 1, "rounds": 2, "local_epochs": 6},
        "agc": {"enabled": False},
        "dp": {"enabled": True, "noise_multiplier": 1.0, "max_grad_norm": 1.0, "delta": 1e-3}}


def _params(**groups):
    return parse_params({**TINY, **{g: {**TINY.get(g, {}), **v} for g, v in groups.items()}})


def _proxy_and_batch(p, private: tuple[float, float] | None):
    """A proxy of the tiny UNet (made private with (noise_multiplier, max_grad_norm) if given) and one
    fixed batch of noisy images."""
    proxy = new_proxy(build_unet(p.model, 8, 1, 0), p, 1)
    if private is not None:
        make_private(proxy, *private, batch_size=8)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand((8, 1, 8, 8), generator=g) * 2 - 1
    noise = torch.randn(x0.shape, generator=g)
    t = torch.randint(0, 10, (8,), generator=g)
    return proxy, (build_scheduler(p.model).add_noise(x0, noise, t), t, noise)


def _step(p, private) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of the training loop: the weights' update, and the gradient Adam stepped on."""
    proxy, (xt, t, noise) = _proxy_and_batch(p, private)
    adam = proxy.optimizer.original_optimizer if private else proxy.optimizer
    seen = []
    adam.register_step_pre_hook(lambda opt, args, kwargs: seen.append(
        torch.cat([q.grad.detach().flatten() for q in proxy.model.parameters()])))
    before = torch.cat([q.detach().flatten() for q in proxy.model.parameters()])
    backward(proxy, xt, t, noise, p)
    update(proxy, p.train.grad_clip)
    return torch.cat([q.detach().flatten() for q in proxy.model.parameters()]) - before, seen[0]


def test_without_noise_or_clipping_a_private_step_is_the_plain_step():
    """Opacus sums per-sample gradients (an einsum over each layer's activations and output
    gradients) where autograd reduces the batch inside each layer's backward: the same gradient up
    to float32 summation order, a few ulps of its norm (1e-5 of it, as for train.grad_accum in
    test_training). Adam's first update is lr * g / (|g| + eps): for a weight whose gradient is well
    above that rounding it is the same to ~1e-6 lr; for the few whose exact gradient is zero (a bias
    before a GroupNorm) g is rounding noise (~1e-9) of either sign and the update +-lr either way, so
    those are left out of the comparison of updates."""
    p = _params(train={"grad_clip": 1e9, "warmup_share": 0, "lr": 1e-3})
    plain, plain_grad = _step(p, None)
    same, same_grad = _step(p, (0.0, 1e9))
    assert (same_grad - plain_grad).norm() <= 1e-5 * plain_grad.norm()
    real = plain_grad.abs() > 1e-5 * plain_grad.norm() / plain_grad.numel() ** 0.5
    assert real.float().mean() > 0.9 and plain[real].abs().min() > 0.1e-3  # Adam moves them by about lr
    torch.testing.assert_close(same[real], plain[real], rtol=0, atol=1e-3 * 1e-3)
    noised, _ = _step(p, (1.0, 1e-2))
    assert (noised - plain)[real].abs().max() > 0.5e-3


def test_each_samples_gradient_is_clipped_to_max_grad_norm():
    p = _params()
    proxy, (xt, t, noise) = _proxy_and_batch(p, (0.0, 1e-3))
    backward(proxy, xt, t, noise, p)
    params = list(proxy.model.parameters())
    per_sample = torch.cat([q.grad_sample.flatten(1) for q in params], dim=1)  # [batch, weights]
    plain = torch.cat([q.grad.flatten() for q in params])
    torch.testing.assert_close(per_sample.mean(0), plain, rtol=1e-4, atol=1e-7)  # one gradient per sample
    assert per_sample.norm(dim=1).min() > 1e-2  # every sample above the clip, by 10x at least
    proxy.optimizer.pre_step()  # clip, noise (none here), divide by the batch: what step() applies
    private = torch.cat([q.grad.flatten() for q in params])
    expected = (per_sample / per_sample.norm(dim=1, keepdim=True) * 1e-3).mean(0)
    torch.testing.assert_close(private, expected, rtol=1e-3, atol=1e-9)
    assert private.norm() <= 1e-3 * (1 + 1e-5) < plain.norm() / 10


def test_a_tiny_private_run_trains_and_reports_its_epsilon(tmp_path):
    p = _params()
    g = np.random.default_rng(0)
    train = ImageSet(g.integers(0, 256, (16, 1, 8, 8), dtype=np.uint8), np.arange(16) % 4, np.arange(16))
    plan = rounds.Plan.iet(p)
    assert plan.mitigations == ("dp",) and plan.variant == "DP-SGD (sigma=1.0)"
    assert plan.steps_per_round == rounds.Plan.baseline(p).steps_per_round == 12  # the baseline's compute
    summary = rounds.run(p, plan, train, np.zeros(16, dtype=np.int64), tmp_path / "out", tmp_path / "rounds")
    info = json.loads((tmp_path / "out/train_info.json").read_text())
    assert info["variant"] == "DP-SGD (sigma=1.0)" and info["dp"] is True and info["optimizer_steps"] == 24
    assert info["dp_epsilon"] == summary["dp_epsilon"] == pytest.approx(epsilon(1.0, 8 / 16, 24, 1e-3))
    assert 0 < info["dp_epsilon"] < math.inf
    by_round = [json.loads((tmp_path / f"rounds/round_{r}/profile/round.json").read_text())["dp_epsilon"] for r in (1, 2)]
    assert 0 < by_round[0] < by_round[1] == info["dp_epsilon"]  # spent so far, growing with the steps
    assert (tmp_path / "out/model/unet/diffusion_pytorch_model.safetensors").is_file()


def test_more_noise_spends_less_epsilon():
    assert epsilon(2.0, 0.5, 24, 1e-3) < epsilon(1.0, 0.5, 24, 1e-3) < epsilon(1.0, 0.5, 48, 1e-3)


@pytest.mark.parametrize("groups, key", [
    ({"iet": {"shards": 2}}, "iet.shards"),
    ({"agc": {"enabled": True}}, "agc.enabled"),
    ({"train": {"grad_accum": 2}}, "train.grad_accum"),
    ({"train": {"mixed_precision": "fp16"}}, "train.mixed_precision"),
    ({"train": {"mixed_precision": "bf16"}}, "train.mixed_precision"),
    ({"train": {"batch_size": 6}}, "train.batch_size"),  # 6 does not divide 16
    ({"dp": {"noise_multiplier": 0}}, "dp.noise_multiplier"),
    ({"dp": {"delta": 1}}, "dp.delta"),
])
def test_refused_combinations_say_so_in_one_line_naming_the_key(groups, key):
    with pytest.raises(ConfigError) as err:
        _params(**groups)
    assert key in str(err.value) and "\n" not in str(err.value)
    off = {**groups, "dp": {**groups.get("dp", {}), "enabled": False}}
    if "dp" not in groups:
        _params(**off)  # only with DP on


def test_a_layer_opacus_cannot_train_is_a_one_line_error():
    p = _params()
    proxy = new_proxy(torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4)), p, 1)
    with pytest.raises(ConfigError) as err:
        make_private(proxy, 1.0, 1.0, 8)
    assert "BatchNorm" in str(err.value) and "dp.enabled" in str(err.value) and "\n" not in str(err.value)


def test_variant_names_show_sigma_and_keep_the_old_ones():
    logged = {"iet.shards": "1", "agc.enabled": "False", "dp.enabled": "True", "dp.noise_multiplier": "0.5"}
    assert mitigation.logged_variant(logged, "iet") == "DP-SGD (sigma=0.5)"
    assert mitigation.logged_variant(logged, "baseline") == "baseline"
    # runs from before dp existed, and runs with it off, keep their names
    old = {"iet.shards": "4", "agc.enabled": "True", "msr.enabled": "True", "taa.enabled": "True"}
    assert mitigation.logged_variant(old, "iet") == "IET-AGC+"
    assert mitigation.logged_variant({**old, "dp.enabled": "False", "dp.noise_multiplier": "1.0"}, "iet") == "IET-AGC+"
    assert mitigation.variant_name(1, ("augment", "dp"), {"dp.noise_multiplier": 1}) == "augment+DP-SGD (sigma=1.0)"


def test_a_private_proxy_resumes_where_it_stopped(tmp_path):
    """The DPOptimizer passes Adam's state through save/load, and the noise comes from the proxy's
    saved generator: a resumed proxy takes the same noisy steps."""
    p = _params()
    a, (xt, t, noise) = _proxy_and_batch(p, (1.0, 1.0))
    for _ in range(2):
        backward(a, xt, t, noise, p)
        update(a, p.train.grad_clip)
    save_proxy(a, tmp_path / "proxy.safetensors")
    b, _ = _proxy_and_batch(p, (1.0, 1.0))
    load_proxy(b, tmp_path / "proxy.safetensors")
    assert b.optimizer.state_dict()["state"]  # Adam's moments came back
    for proxy in (a, b):
        backward(proxy, xt, t, noise, p)
        update(proxy, p.train.grad_clip)
    for q, r in zip(a.model.parameters(), b.model.parameters()):
        assert torch.equal(q, r)
