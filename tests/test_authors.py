"""The authors' prototype of MSR (msr.mode: ring) and TAA (taa.mode: queue) follows its rules
(pipeline/mitigation/authors.py): who moves where in the ring, averaging after even rounds only,
strengths exp(-5 d), a queue of kept samples trained on 8 at a time with one optimizer step, no
gradient from the drawn batch, AGC's bank updated by every draw, counters reset by an exchange;
its state resumes bit for bit; it is named IET-AGC+ [authors]."""
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from pipeline import mitigation

from pipeline.train import rounds
from pipeline.core.config import ConfigError, parse_params
from pipeline.train.ensemble import split_shards
from pipeline.core.layout import Rounds
from pipeline.mitigation import Mitigations, RoundEnd, Step
from pipeline.mitigation.authors import (QUEUE_TAKE, averaging_round, exchange_candidates, queue_magnitude,
                                         queue_strength, ring_exchange)
from pipeline.mitigation.randaugment import OPS, apply_op, op_magnitude, rand_augment
from tiny import Stop, random_train, stop_after_round, tiny

pytestmark = pytest.mark.usefixtures("one_thread")

AUTHORS = {"msr": {"mode": "ring"}, "taa": {"mode": "queue"}, "agc": {"tau": 0.8}}


def _params(**groups):
    return parse_params(tiny(**{**AUTHORS, **groups}))


# ---- MSR: the ring ----

def test_a_shard_sends_its_most_skipped_share_in_shard_order():
    members = np.array([5, 2, 9, 7])  # shard order
    skips = np.zeros(10, dtype=np.int64)
    skips[[5, 2, 9, 7]] = [1, 3, 3, 0]
    assert exchange_candidates(members, skips, 0.5).tolist() == [2, 9]
    skips[7] = 3  # three tie for the top two: the first two in shard order go
    assert exchange_candidates(members, skips, 0.5).tolist() == [2, 9]
    assert exchange_candidates(members, np.zeros(10, np.int64), 0.5).tolist() == [5, 2]  # no skips: the first go
    assert exchange_candidates(members, skips, 0.2).tolist() == []  # int(0.8) = 0


def test_the_ring_sends_each_shard_to_the_next_losing_and_duplicating_nothing():
    shard = np.array([0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2])
    skips = np.array([0, 5, 0, 1, 2, 0, 0, 0, 0, 0, 0, 9])
    arrival = np.arange(12)
    new, order, moves = ring_exchange(shard, skips, arrival, 3, 0.25)
    assert moves == [(1, 0, 1), (4, 1, 2), (11, 2, 0)]
    assert new.tolist() == [0, 1, 0, 0, 2, 1, 1, 1, 2, 2, 2, 0]
    assert sorted(np.bincount(new).tolist()) == [4, 4, 4]  # every sample in exactly one shard, sizes kept
    # the receiver appends what it got after its own samples; received samples are not sent on
    assert order[11] > order[[0, 2, 3]].max() and order[1] > order[[5, 6, 7]].max()
    _, _, again = ring_exchange(new, np.zeros(12, np.int64), order, 3, 0.25)
    assert [m[0] for m in again] == [0, 5, 8]  # with no skips, the first of each shard in its order


def test_averaging_after_even_rounds_and_the_last_only():
    assert [averaging_round(r, 5) for r in range(5)] == [True, False, True, False, True]
    assert [averaging_round(r, 4) for r in range(4)] == [True, False, True, True]


def test_skip_counts_accumulate_until_an_exchange_then_reset():
    p = _params(msr={"mode": "ring", "exchange": 0.5})  # one of each shard of 3
    m = Mitigations(("agc", "msr"), p, 6, (0, 1))
    ring = m.built["msr"]
    shard = np.array([0, 0, 0, 1, 1, 1])
    step = Step(torch.tensor([0, 1, 2]), torch.zeros(3, dtype=torch.long), torch.ones(3),
                torch.tensor([True, False, False]))
    m.observe(0, step)
    end = RoundEnd(shard, np.zeros(6), np.zeros((6, 2)), None, round=0)
    m.end_round(end)  # an even round: no exchange, counts kept
    assert end.moves == [] and ring.skips.tolist() == [0, 1, 1, 0, 0, 0]
    m.observe(0, step)
    end = RoundEnd(shard, np.zeros(6), np.zeros((6, 2)), None, round=1)
    m.end_round(end)
    assert [(mv["position"], mv["from"], mv["to"]) for mv in end.moves] == [(1, 0, 1), (3, 1, 0)]
    assert ring.skips.tolist() == [0] * 6
    assert m.weights([3, 5]) == [1.0, 1.0]  # the prototype's plain mean


def _run(tmp_path, hooks=None, **groups):
    p = _params(**groups)
    train = random_train()
    return rounds.run(p, rounds.Plan.iet(p), train, split_shards(train.labels, 3, 0), tmp_path / "out",
                      tmp_path / "rounds", hooks=hooks)


def _weights(state: dict) -> torch.Tensor:
    return torch.cat([v.flatten() for _, v in sorted(state.items())])


def test_proxies_are_averaged_after_even_rounds_only(tmp_path):
    with pytest.raises(Stop):
        _run(tmp_path, hooks=stop_after_round(1), iet={"rounds": 4})
    folders = Rounds(tmp_path / "rounds")
    assert folders.complete() == 2
    p = _params(iet={"rounds": 4})
    train = random_train()
    for rnd, averaged in ((0, True), (1, False)):  # the state the next round starts from, as a resume loads it
        r = rounds.start(p, rounds.Plan.iet(p), train, split_shards(train.labels, 3, 0), folders.root)
        rounds.restore_round_end(r, rnd)
        weights = [_weights(r.proxies[j].model.state_dict()) for j in range(3)]
        assert all(torch.equal(weights[0], w) for w in weights[1:]) == averaged
    # an unaveraged round still saves the proxies' plain mean, for evaluation
    ends = [{k[6:]: v for k, v in load_file(str(folders.train(2) / f"proxy_{j}.safetensors")).items()
             if k.startswith("model.")} for j in range(3)]
    assert not all(torch.equal(_weights(ends[0]), _weights(e)) for e in ends[1:])
    mean = load_file(str(folders.aggregate(2) / "aggregated.safetensors"))
    key = next(iter(mean))
    assert torch.allclose(mean[key], sum(e[key].double() for e in ends).float() / 3)


# ---- TAA: the queue ----

def test_strength_is_exp_minus_5_times_the_distance_to_the_threshold():
    bank = torch.tensor([1.0, 1.0, 2.0, 0.0])
    losses = torch.tensor([0.8, 1.0, 2.0, 0.5])
    s = queue_strength(losses, bank, tau=0.8)  # mem_ratio 1.25
    d = torch.tensor([0.0, 0.25, 0.25, 0.625 / 1e-8])
    assert torch.allclose(s, torch.exp(-5 * d))
    assert s[0] == 1 and s[3] == 0  # at the threshold 1; a fresh bank gives no strength
    assert queue_magnitude(torch.tensor([0.5, 0.69]), 5.0) == 2  # int(0.595 x 5)


def test_the_queue_holds_kept_samples_and_hands_out_its_first_8_once_it_holds_a_batch():
    p = _params(train={"batch_size": 10})
    m = Mitigations(("agc", "taa"), p, 20, (0,), images=random_train(20).images)
    taa = m.built["taa"]
    gen = torch.Generator().manual_seed(0)
    t = torch.zeros(6, dtype=torch.long)
    keep = torch.tensor([True, False, True, True, False, True])
    m.observe(0, Step(torch.arange(6), t, torch.ones(6), keep))
    assert taa.queue[0].tolist() == [0, 2, 3, 5] and m.queued(0, gen) is None  # 4 < a batch of 10
    m.observe(0, Step(torch.arange(6, 12), t, torch.ones(6), torch.ones(6, dtype=torch.bool)))
    positions, x0 = m.queued(0, gen)
    assert positions.tolist() == [0, 2, 3, 5, 6, 7, 8, 9] and len(positions) == QUEUE_TAKE
    assert x0.shape == (8, 1, 8, 8) and x0.min() >= -1 and x0.max() <= 1
    assert len(taa.queue[0]) == 0 and m.queued(0, gen) is None  # emptied: the 2 beyond the first 8 are dropped


def _train_one_proxy(p, images, steps):
    from pipeline.core.models import build_scheduler
    from pipeline.core.pretrained import initial_unet
    from pipeline.train.training import OneProxy, RoundCounts, new_proxy, train_steps

    proxy = new_proxy(initial_unet(p, 0), p, 1, "cpu", steps)
    before = [w.detach().clone() for w in proxy.model.parameters()]
    m = Mitigations(("agc", "taa"), p, len(images), (0,), images=images)
    train_steps(OneProxy(0, proxy, p), torch.from_numpy(images).float() / 127.5 - 1, {0: torch.arange(len(images))},
                steps, build_scheduler(p.model), p, m, RoundCounts.zeros(len(images)))
    changed = any(not torch.equal(a, b) for a, b in zip(before, proxy.model.parameters()))
    return proxy, m, changed


def test_the_drawn_batch_gives_no_gradient():
    """One draw of all 12 samples against a fresh bank: AGC keeps every one, but 12 queued are less
    than a batch of 16, so no optimizer step: the weights are untouched, the queue holds all 12."""
    p = _params(train={"batch_size": 16})
    proxy, m, changed = _train_one_proxy(p, random_train().images, 1)
    assert not changed and proxy.step == 0 and len(m.built["taa"].queue[0]) == 12


def test_every_drawn_sample_updates_the_bank_kept_or_skipped():
    p = _params()
    m = Mitigations(("agc", "taa"), p, 4, (0,), images=random_train(4).images)
    bank = m.built["agc"].refs[0]
    m.observe(0, Step(torch.arange(2), torch.tensor([1, 2]), torch.ones(2), torch.ones(2, dtype=torch.bool)))
    losses = torch.tensor([0.1, 2.0])  # against the bank: 0.2 at t = 1, still 0 at t = 3
    keep = m.keep(0, losses, torch.tensor([1, 3]), torch.tensor([2, 3]))
    assert keep.tolist() == [False, True]
    m.observe(0, Step(torch.tensor([2, 3]), torch.tensor([1, 3]), losses, keep))
    assert bank.bank[1] == pytest.approx(0.8 * 0.2 + 0.2 * 0.1) and bank.bank[3] == pytest.approx(0.4)
    assert m.built["taa"].queue[0].tolist() == [0, 1, 3]  # the skipped sample 2 is not queued


def test_each_full_queue_is_one_optimizer_step():
    p = _params(agc={"tau": 0.01})  # AGC keeps nearly every sample: the queue fills at every draw
    proxy, m, changed = _train_one_proxy(p, random_train().images, 5)
    steps = m.built["taa"].steps[0]
    assert changed and steps >= 4 and proxy.step == steps
    adam = next(iter(proxy.optimizer.state.values()))
    assert int(adam["step"]) == steps


# ---- resume, names, refusals, RandAugment ----

def test_an_interrupted_authors_run_resumes_to_the_same_weights(tmp_path):
    """Cut after round 2 (averaged; saved with skip counts since round 1's exchange, that exchange's
    shard order and part-filled queues): the resumed round 3 must make the same exchange and reach
    the same weights. tau 1 and 12 draws a round so that AGC skips."""
    groups = {"iet": {"rounds": 4, "local_epochs": 24}, "agc": {"tau": 1.0}}
    with pytest.raises(Stop):
        _run(tmp_path / "cut", hooks=stop_after_round(2), **groups)
    cut = Rounds(tmp_path / "cut/rounds")
    assert cut.complete() == 3 and not cut.round(4).exists()  # rounds 0-2 (round_1..3) saved, round 3 to run
    saved = load_file(str(cut.profile(3) / "samples.safetensors"))  # what round 3 starts from
    assert saved["msr.skips"].sum() > 0 and not torch.equal(saved["msr.arrival"], torch.arange(12))
    queues = [load_file(str(cut.profile(3) / f"mitigations_{j}.safetensors"))["taa.queue"] for j in range(3)]
    assert any(len(q) for q in queues)
    resumed = _run(tmp_path / "cut", **groups)
    straight = _run(tmp_path / "straight", **groups)
    assert resumed["taa_queue_steps_total"] == straight["taa_queue_steps_total"] == straight["optimizer_steps"] > 0
    for m in ("model", "model_ema"):
        a = load_file(str(tmp_path / f"cut/out/{m}/unet/diffusion_pytorch_model.safetensors"))
        b = load_file(str(tmp_path / f"straight/out/{m}/unet/diffusion_pytorch_model.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a)
    for name in ("shards.csv", "moves.csv"):
        path = f"rounds/round_4/profile/{name}"
        assert (tmp_path / "cut" / path).read_text() == (tmp_path / "straight" / path).read_text()
    assert (tmp_path / "straight/rounds/round_4/profile/moves.csv").read_text().count("\n") == 1 + 3  # one from each shard


def test_the_variant_is_named_iet_agc_plus_authors():
    assert rounds.Plan.iet(_params()).variant == "IET-AGC+ [authors]"
    assert rounds.Plan.iet(parse_params(tiny(msr={"mode": "ring"}))).variant == "IET-AGC+ [ring]"
    assert rounds.Plan.iet(parse_params(tiny(taa={"mode": "queue"}))).variant == "IET-AGC+ [queue]"
    assert rounds.Plan.iet(parse_params(tiny())).variant == "IET-AGC+"
    flat = {"iet.shards": "3", "msr.mode": "ring", "taa.mode": "queue", "agc.reference": "pooled"}
    assert mitigation.logged_variant(flat, "iet") == "IET-AGC+ [authors, pooled]"


@pytest.mark.parametrize("groups, message", [
    ({"msr": {"mode": "ring"}, "iet": {"split": "groups"}}, "msr.mode ring moves single samples"),
    ({"taa": {"mode": "queue"}, "train": {"stack_proxies": "true"}},
     "train.stack_proxies cannot be true with taa.mode queue"),
    ({"taa": {"augment_base": 31}}, "taa.augment_base"),
    ({"msr": {"mode": "authors"}}, "msr.mode"),
])
def test_settings_the_authors_mode_cannot_run_with_are_refused_in_one_line(groups, message):
    with pytest.raises(ConfigError) as err:
        parse_params(tiny(**groups))
    assert message in str(err.value) and "\n" not in str(err.value).strip()


def test_rand_augment_ops_follow_the_magnitude_table_and_never_mirror():
    assert not any("Flip" in op or "Mirror" in op for op in OPS)
    assert op_magnitude("Rotate", 30, 8, 8) == pytest.approx(30.0)
    assert op_magnitude("Posterize", 0, 8, 8) == 8 and op_magnitude("Posterize", 30, 8, 8) == 4
    assert op_magnitude("Solarize", 0, 8, 8) == 255
    img = torch.zeros(1, 5, 5, dtype=torch.uint8)
    img[0, 1, 1] = 200
    assert apply_op(img, "TranslateX", 2.0)[0, 1, 3] == 200  # moved right, not mirrored
    for op in ("ShearX", "ShearY", "TranslateY", "Rotate", "Brightness", "Color", "Contrast", "Sharpness"):
        assert torch.equal(apply_op(img, op, 0.0), img), op  # the signed ops' bin 0 changes nothing
    assert not torch.equal(apply_op(img, "Rotate", 30.0), img)
    out = rand_augment(torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8), 5, torch.Generator().manual_seed(0))
    assert out.dtype == torch.uint8 and out.shape == (4, 1, 8, 8)
    with pytest.raises(ValueError):
        rand_augment(out, 31, torch.Generator())
