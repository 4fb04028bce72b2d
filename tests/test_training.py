"""One proxy's training step: gradient accumulation, mixed precision, and the errors that stop a run."""
import pytest
import torch
from click.testing import CliRunner

from pipeline.core.config import parse_params
from pipeline.core.models import build_scheduler, build_unet
from pipeline.mitigation import Mitigations
from pipeline.mitigation.agc import keep_mask
from pipeline.core.checkpoint import load_proxy, save_proxy
from pipeline.train.training import OneProxy, RoundCounts, backward, new_proxy, train_steps
from tiny import tiny

TINY = tiny(data={'train_size': 16}, agc={'tau': 0.9})


def _setup(**train):
    p = parse_params({**TINY, "train": {**TINY["train"], **train}})
    init = build_unet(p.model, 8, 1, 0)
    return p, new_proxy(init, p, 1), build_scheduler(p.model)


def _batch(p, sched, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand((8, 1, 8, 8), generator=g) * 2 - 1
    noise = torch.randn(x0.shape, generator=g)
    t = torch.randint(0, 10, (8,), generator=g)
    return sched.add_noise(x0, noise, t), t, noise


@pytest.mark.parametrize("use_agc", [False, True])
def test_accumulated_micro_batches_give_the_full_batch_gradient(use_agc):
    """Same gradient up to float summation order: per-sample sums back-propagated per micro-batch,
    divided once by the whole batch's kept count, against one mean over the batch."""
    grads, kept = [], []
    for accum in (1, 3):  # 3 does not divide 8: micro-batches of 3, 3, 2
        p, proxy, sched = _setup(grad_accum=accum)
        xt, t, noise = _batch(p, sched)
        if use_agc:  # a bank at which AGC keeps the upper half of this batch's losses
            with torch.no_grad():
                plain = (proxy.model(xt, t).sample - noise).pow(2).mean(dim=(1, 2, 3))
            bank = torch.full((10,), plain.median().item() / p.agc.tau)
        keep_fn = (lambda losses, sl: keep_mask(losses, bank[t[sl]], p.agc.tau)) if use_agc else (lambda losses, sl: None)
        losses, keep, loss = backward(proxy, xt, t, noise, p, keep_fn)
        grads.append(torch.cat([q.grad.flatten() for q in proxy.model.parameters()]))
        kept.append((keep.clone(), loss.item(), losses.clone()))
    assert torch.equal(kept[0][0], kept[1][0])
    if use_agc:
        assert 0 < kept[0][0].sum() < 8, "the bank should keep some samples and skip others"
    torch.testing.assert_close(kept[1][2], kept[0][2], rtol=1e-5, atol=1e-7)
    assert kept[1][1] == pytest.approx(kept[0][1], rel=1e-5)
    # float32 sums over 3 micro-batches instead of 1: relative error of a few ulps of the norm
    assert (grads[1] - grads[0]).norm() <= 1e-5 * grads[0].norm()


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_and_its_loss_scale_survives_a_checkpoint(precision, tmp_path):
    p, proxy, sched = _setup(mixed_precision=precision)
    images = torch.rand((16, 1, 8, 8)) * 2 - 1
    before = [q.detach().clone() for q in proxy.model.parameters()]
    train_steps(OneProxy(0, proxy, p), images, {0: torch.arange(16)}, 3, sched, p, Mitigations((), p, 16, (0,)),
                RoundCounts.zeros(16))
    assert all(torch.isfinite(q).all() for q in proxy.model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, proxy.model.parameters()))
    assert proxy.scaler.is_enabled() == (precision == "fp16")
    save_proxy(proxy, tmp_path / "proxy.safetensors")
    _, fresh, _ = _setup(mixed_precision=precision)
    load_proxy(fresh, tmp_path / "proxy.safetensors")
    assert fresh.scaler.state_dict() == proxy.scaler.state_dict()
    assert fresh.step == proxy.step == 3


def test_a_non_finite_loss_names_round_proxy_and_step():
    p, proxy, sched = _setup()
    images = torch.zeros((16, 1, 8, 8))
    agc = Mitigations(("agc",), p, 16, (0,))
    train_steps(OneProxy(0, proxy, p), images, {0: torch.arange(16)}, 2, sched, p, agc, RoundCounts.zeros(16))
    bank = agc.items[0].refs[0].bank.clone()
    images[:] = float("nan")
    counts = RoundCounts.zeros(16)
    with pytest.raises(FloatingPointError, match=r"round 2/4 proxy 3/4: loss is nan at step 3"):
        train_steps(OneProxy(0, proxy, p), images, {0: torch.arange(16)}, 2, sched, p, agc, counts,
                    desc="round 2/4 proxy 3/4")
    assert proxy.step == 2  # the failed step changed nothing: not the step count, the bank or the counts
    assert torch.equal(agc.items[0].refs[0].bank, bank) and counts.drawn.sum() == 0


def test_the_stage_reports_a_diverged_run_in_one_line_and_exits_1():
    """What the user sees from `dvc repro` when training diverges: no traceback, exit 1."""
    import click

    from stages import stage

    @click.command()
    @stage
    def fake():
        raise FloatingPointError("round 1/4 proxy 2/4: loss is nan at step 7; the last complete round is kept")

    result = CliRunner().invoke(fake, [])
    assert result.exit_code == 1
    assert "Error: round 1/4 proxy 2/4: loss is nan at step 7" in result.output
    assert "Traceback" not in result.output


def test_an_epoch_is_a_permutation_in_full_batches_of_distinct_samples():
    from pipeline.train.training import _batches

    shard = torch.arange(10, 20)
    stream = _batches(shard, 4, torch.Generator().manual_seed(0))
    epochs = [[next(stream) for _ in range(2)] for _ in range(3)]  # 10 // 4 = 2 full batches an epoch
    for batches in epochs:
        drawn = torch.cat(batches)
        assert len(set(drawn.tolist())) == 8 and set(drawn.tolist()) <= set(shard.tolist())  # no repeat, 2 left out
    assert [b.tolist() for b in epochs[0]] != [b.tolist() for b in epochs[1]]  # a fresh permutation each
    small = _batches(torch.arange(3), 8, torch.Generator().manual_seed(0))
    assert sorted(next(small).tolist()) == [0, 1, 2]  # smaller than a batch: one batch of itself
    with pytest.raises(ValueError, match="no training samples"):
        next(_batches(torch.arange(0), 8, torch.Generator()))


def test_the_round_steps_follow_the_shard_sizes_and_add_up_to_the_baselines():
    from pipeline.train.rounds import proxy_steps

    assert proxy_steps(288, [98, 98, 98, 98]) == [72] * 4
    steps = proxy_steps(288, [72, 120, 98, 102])  # shards as MSR left them
    assert sum(steps) == 288 and steps == [53, 88, 72, 75]  # 288 x 72/392 = 52.9, ...: the same epochs each
    assert proxy_steps(10, [1, 1, 1]) in ([4, 3, 3], [3, 4, 3], [3, 3, 4]) and sum(proxy_steps(10, [1, 1, 1])) == 10
    assert proxy_steps(5, [0, 4]) == [0, 5]
