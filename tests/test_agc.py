"""AGC against a direct transcription of the official per-sample loop."""
import torch

from pipeline.mitigation import agc
from pipeline.training import masked_loss


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
        keep = agc.keep_mask(losses, t, bank, tau)
        loss = masked_loss(losses, keep)
        new_bank = agc.update_bank(bank, t, losses, 0.8)
        ref_keep, ref_loss, ref_bank = official(losses, t, bank, tau, 0.8)
        assert torch.equal(keep, ref_keep)
        assert 0 < keep.sum() < len(t)  # the fixed batch exercises both branches
        torch.testing.assert_close(loss, ref_loss.to(loss.dtype))
        torch.testing.assert_close(new_bank, ref_bank, rtol=1e-12, atol=1e-14)


def test_all_skipped_batch_gives_zero_loss_and_zero_gradient():
    losses = torch.tensor([0.1, 0.2], requires_grad=True)
    keep = agc.keep_mask(losses.detach(), torch.tensor([0, 1]), torch.tensor([1.0, 1.0]), 0.5)
    assert not keep.any()
    loss = masked_loss(losses, keep)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(losses.grad, torch.zeros(2))


def test_skipped_samples_get_no_gradient_kept_ones_the_renormalised_mean():
    losses = torch.tensor([0.1, 0.5, 0.9], requires_grad=True)
    keep = torch.tensor([False, True, True])
    masked_loss(losses, keep).backward()
    assert torch.equal(losses.grad, torch.tensor([0.0, 0.5, 0.5]))
