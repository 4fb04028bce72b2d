"""AGC against a direct transcription of the official per-sample loop."""
import pytest
import torch

from pipeline.mitigation import agc
from pipeline.train.training import masked_loss


def official(losses, t, bank, tau, decay):
    """The official code's logic, one sample at a time with .item()."""
    bank = bank.clone()
    keep = [losses[i].item() >= tau * bank[t[i]].item() for i in range(len(losses))]
    kept = [losses[i] for i in range(len(losses)) if keep[i]]
    loss = sum(kept) / max(len(kept), 1) if kept else torch.tensor(0.0)
    for i in range(len(losses)):
        bank[t[i]] = decay * bank[t[i]] + (1 - decay) * losses[i].item()
    return torch.tensor(keep), torch.as_tensor(loss), bank


def test_mask_loss_and_bank_match_the_official_loop_with_repeated_timesteps():
    g = torch.Generator().manual_seed(0)
    T = 10
    bank = torch.rand(T, generator=g, dtype=torch.float64) * 0.6
    bank[3] = 0.0  # a timestep never seen keeps every sample
    t = torch.tensor([1, 3, 1, 5, 1, 7, 5, 3, 9, 9, 9, 9])
    losses = torch.rand(len(t), generator=g, dtype=torch.float64) * 0.3
    for tau in (0.5, 0.8, 1.0):
        keep = agc.keep_mask(losses, bank[t], tau)
        loss = masked_loss(losses, keep)
        new_bank = agc.update_bank(bank, t, losses, 0.8)
        ref_keep, ref_loss, ref_bank = official(losses, t, bank, tau, 0.8)
        assert torch.equal(keep, ref_keep)
        assert 0 < keep.sum() < len(t)  # the fixed batch exercises both branches
        torch.testing.assert_close(loss, ref_loss.to(loss.dtype))
        torch.testing.assert_close(new_bank, ref_bank, rtol=1e-12, atol=1e-14)


def test_all_skipped_batch_gives_zero_loss_and_zero_gradient():
    losses = torch.tensor([0.1, 0.2], requires_grad=True)
    keep = agc.keep_mask(losses.detach(), torch.tensor([1.0, 1.0]), 0.5)
    assert not keep.any()
    loss = masked_loss(losses, keep)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(losses.grad, torch.zeros(2))


def test_skipped_samples_get_no_gradient_kept_ones_the_renormalised_mean():
    losses = torch.tensor([0.1, 0.5, 0.9], requires_grad=True)
    keep = torch.tensor([False, True, True])
    masked_loss(losses, keep).backward()
    assert torch.equal(losses.grad, torch.tensor([0.0, 0.5, 0.5]))


# ---------------------------------------------------------------- AGC variants (docs/method.md#agc-variants)

def test_the_pooled_reference_equals_an_explicit_loop_with_repeated_bins_and_bias_correction():
    T, B, d = 100, 10, 0.9
    ref = agc.PooledReference(T, "cpu", B, d)
    m, n = [0.0] * B, [0] * B
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        t = torch.randint(0, T, (16,), generator=g)
        t[:4] = 37  # one bin drawn several times in a batch
        losses = torch.rand(16, generator=g, dtype=torch.float64).float()
        ref.update(t, losses)
        for ti, li in zip(t.tolist(), losses.tolist()):  # batch order, as the official bank's loop
            b = ti * B // T
            m[b] = d * m[b] + (1 - d) * li
            n[b] += 1
    expected = torch.tensor([m[t * B // T] / (1 - d ** n[t * B // T]) if n[t * B // T] else 0.0 for t in range(T)])
    torch.testing.assert_close(ref(torch.arange(T)), expected, rtol=1e-5, atol=1e-7)
    assert min(n) == 0 or max(n) > 1  # repeated bins were exercised
    one = agc.PooledReference(T, "cpu", B, d)
    one.update(torch.tensor([5]), torch.tensor([0.3]))
    assert one(torch.tensor([5])).item() == pytest.approx(0.3)  # bias-corrected: one draw reads as itself


def test_the_image_score_equals_its_per_draw_recursion():
    d, m, tau = 0.8, 3, 0.5
    score = agc.ImageScore(6, "cpu", d, m)
    s, n = [0.0] * 6, [0] * 6
    g = torch.Generator().manual_seed(2)
    for _ in range(8):
        positions = torch.randperm(6, generator=g)[:4]
        ratio = torch.rand(4, generator=g) * 1.2
        ratio[0] = float("inf")  # no reference yet: no evidence, the score stays
        keep = score.keep(positions, tau)
        for j, i in enumerate(positions.tolist()):
            corrected = s[i] / (1 - d ** max(n[i], 1))
            assert bool(keep[j]) == (n[i] < m or corrected >= tau)
        score.update(positions, ratio)
        for j, i in enumerate(positions.tolist()):
            if j > 0:
                s[i], n[i] = d * s[i] + (1 - d) * float(ratio[j]), n[i] + 1
    torch.testing.assert_close(score.score, torch.tensor(s), rtol=1e-5, atol=1e-6)
    assert score.draws.tolist() == n and max(n) >= m


def test_variants_of_agc_are_named_by_what_differs_from_the_official_one():
    from pipeline import mitigation

    assert mitigation.variant_name(4, mitigation.FULL_METHOD, {"agc.reference": "official", "agc.score": "draw"}) == "IET-AGC+"
    assert mitigation.variant_name(4, mitigation.FULL_METHOD,
                                   {"agc.reference": "pooled", "agc.score": "image"}) == "IET-AGC+ [pooled, image]"
    assert mitigation.variant_name(1, ("agc",), {"agc.reference": "pooled"}) == "AGC [pooled]"
    # the shard split is named where there are shards, and is no setting of its own in the ablation
    groups = {"agc.reference": "pooled", "agc.score": "draw", "iet.split": "groups"}
    assert mitigation.variant_name(4, mitigation.FULL_METHOD, groups) == "IET-AGC+ [pooled, groups]"
    assert mitigation.variant_name(1, ("agc",), groups) == "AGC [pooled]"
    assert "iet.split" in mitigation.shown_keys()


def test_pooled_image_score_agc_trains_inside_iet_and_resumes_bit_for_bit(tmp_path):
    """IET-AGC+ with the pooled reference and the image score: it skips, and its per-proxy and
    per-sample state survives a resume (the weights equal an uninterrupted run's)."""
    import copy

    import numpy as np
    from safetensors.torch import load_file

    from pipeline.train import rounds
    from pipeline.core.config import parse_params
    from pipeline.train.ensemble import split_shards
    from pipeline.core.layout import Rounds
    from test_pinned import TINY
    from tiny import Stop, random_train, stop_after_round

    raw = copy.deepcopy(TINY)
    raw["agc"].update(reference="pooled", score="image", bins=5, min_draws=2)
    p = parse_params(raw)
    train = random_train()

    def run(where, hooks=None):
        summary = rounds.run(p, rounds.Plan.iet(p), train, split_shards(train.labels, 3, 0), where / "out",
                             where / "rounds", hooks=hooks)
        return summary, load_file(str(where / "out/model/unet/diffusion_pytorch_model.safetensors"))

    with pytest.raises(Stop):
        run(tmp_path / "resumed", stop_after_round(0))
    assert Rounds(tmp_path / "resumed/rounds").complete() == 1  # resumes from round 1's start, as saved after round 0
    _, resumed = run(tmp_path / "resumed")
    summary, straight = run(tmp_path / "straight")
    assert summary["variant"] == "IET-AGC+ [pooled, image]"
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)
    kept = np.genfromtxt(tmp_path / "straight/out/curves.csv", delimiter=",", names=True)["kept"]
    assert kept.min() < 1.0  # the image score skipped some draws


def test_each_round_logs_the_skip_rate_of_duplicated_and_of_unique_samples(tmp_path):
    """round.json (and so the training run's MLflow metrics) hold the mean skip rate of the samples
    whose image occurs several times and of the others, as the loss table's skip rates give them."""
    import csv
    import json

    import numpy as np

    from pipeline.train import rounds
    from pipeline.core.config import parse_params
    from pipeline.train.ensemble import split_shards
    from test_pinned import TINY
    from tiny import random_train

    p = parse_params(TINY)
    train = random_train()
    train.images[6:9] = train.images[0]  # one image stored four times
    rounds.run(p, rounds.Plan.iet(p), train, split_shards(train.labels, 3, 0), tmp_path / "out", tmp_path / "rounds")
    for rnd in range(1, 4):
        folder = tmp_path / f"rounds/round_{rnd}/profile"
        metrics = json.loads((folder / "round.json").read_text())
        with open(folder / "loss_table.csv") as f:
            rate = {int(r["sample_id"]): float(r["skip_rate"]) for r in csv.DictReader(f)}
        duplicated = [100, 106, 107, 108]
        assert metrics["skip_rate_duplicated"] == pytest.approx(np.mean([rate[i] for i in duplicated]))
        assert metrics["skip_rate_unique"] == pytest.approx(np.mean([v for i, v in rate.items() if i not in duplicated]))
