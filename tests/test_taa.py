import torch
from hypothesis import given, settings, strategies as st

from pipeline.mitigation import taa
from pipeline.core.config import TAAConfig

CFG = TAAConfig(margin=0.1, rise=0.5, decay=0.9, max_shift=2, flip=True, jitter=0.2)


def test_strength_rises_with_the_shortfall_below_threshold_and_decays_above():
    tau = 0.5
    bank_t = torch.ones(6)
    losses = torch.tensor([0.0, 0.1, 0.3, 0.55, 0.7, 2.0])  # ratios; threshold tau + margin = 0.6
    s = taa.update_strength(torch.full((6,), 0.2), losses, bank_t, tau, CFG)
    assert torch.all(s[:4].diff() <= 0)  # further below -> stronger
    assert s[0] > s[3] > 0.2
    torch.testing.assert_close(s[4:], torch.full((2,), 0.2 * CFG.decay))
    assert torch.all((s >= 0) & (s <= 1))
    # an unseen timestep (bank 0) gives no evidence: decay
    assert taa.update_strength(torch.tensor([0.5]), torch.tensor([0.0]), torch.tensor([0.0]), tau, CFG) == 0.45


def test_zero_strength_leaves_samples_unchanged_bit_for_bit():
    x = torch.rand(8, 1, 16, 16) * 2 - 1
    out = taa.augment(x, torch.zeros(8), CFG, torch.Generator().manual_seed(0))
    assert torch.equal(out, x)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 1000), st.floats(0, 1), st.sampled_from([1, 3]))
def test_augmentation_keeps_shape_dtype_and_range(seed, s, channels):
    x = torch.rand(5, channels, 12, 12, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    out = taa.augment(x, torch.full((5,), s), CFG, torch.Generator().manual_seed(seed))
    assert out.shape == x.shape and out.dtype == x.dtype
    assert out.min() >= -1 and out.max() <= 1


def test_full_strength_changes_samples_and_shift_is_a_translation():
    x = -torch.ones(64, 1, 8, 8)
    x[:, :, 3, 4] = 1.0  # one bright pixel away from the border
    cfg = TAAConfig(max_shift=2, flip=False, jitter=0.0)
    out = taa.augment(x, torch.ones(64), cfg, torch.Generator().manual_seed(1))
    assert torch.all((out == 1).sum(dim=(1, 2, 3)) == 1)  # still exactly one bright pixel, moved
    moved = (out != x).flatten(1).any(1)
    assert moved.float().mean() > 0.5
