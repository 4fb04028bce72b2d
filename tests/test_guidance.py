"""Anti-memorization guidance (pipeline/evaluate/guidance.py) on tiny tensors: plain DDIM where it is
inactive, away from the nearest training image where active, seeded, and a planted copy that plain
sampling makes and guided sampling does not."""
import types

import pytest
import torch
from torch import nn

from pipeline.evaluate import guidance, sampling

from pipeline.core import metrics
from pipeline.core.config import AMGConfig
from pipeline.core.models import build_scheduler, build_unet
from tiny import arch

pytestmark = pytest.mark.usefixtures("one_thread")

NEVER = AMGConfig(enabled=True, threshold_start=1e-6, threshold_end=1e-6)  # no estimate is this close
ALWAYS = AMGConfig(enabled=True, threshold_start=10.0, threshold_end=10.0)  # nor this far (at most 2)


@pytest.fixture(scope="module")
def tiny_model():
    """An untrained tiny UNet, its scheduler and 20 random 'training' images in [-1, 1]."""
    reference = torch.rand(20, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    return build_unet(arch(), 8, 1, seed=0), build_scheduler(arch()), reference


def test_inactive_below_the_threshold_is_plain_ddim_bit_for_bit(tiny_model):
    unet, scheduler, reference = tiny_model
    plain = sampling.sample(unet, scheduler, 6, 10, seed=3, batch_size=4, progress=False)
    guided = guidance.sample(unet, scheduler, 6, 10, seed=3, batch_size=4, progress=False,
                             reference=reference, amg=NEVER)
    assert torch.equal(plain, guided)


def test_above_the_threshold_each_estimate_moves_away_from_its_nearest_image(tiny_model):
    unet, scheduler, reference = tiny_model
    x = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor(5)
    alpha_bar = scheduler.alphas_cumprod[t]
    with torch.no_grad():
        plain_eps = unet(x, t).sample
    small_step = ALWAYS.model_copy(update={"scale": 1e-3})  # the first-order effect, no overshoot
    guided_eps, active = guidance.guided_eps(unet, x, t, alpha_bar, reference, small_step)
    assert active.all()

    def x0_hat(eps):
        return (x - (1 - alpha_bar).sqrt() * eps) / alpha_bar.sqrt()

    before, after = (guidance.normalized_l2_scores(x0_hat(e), reference) for e in (plain_eps, guided_eps))
    assert (after > before).all()
    # and from the very image it was nearest to, not only relative to the others
    nearest = metrics.nearest_neighbors(x0_hat(plain_eps), reference, 1)[1][:, 0]
    moved = (x0_hat(guided_eps) - reference[nearest]).flatten(1).norm(dim=1)
    assert (moved > (x0_hat(plain_eps) - reference[nearest]).flatten(1).norm(dim=1)).all()


def test_a_seed_gives_the_same_images_and_another_seed_others(tiny_model):
    unet, scheduler, reference = tiny_model

    def draw(seed):
        return guidance.sample(unet, scheduler, 4, 10, seed=seed, progress=False, reference=reference, amg=ALWAYS)

    first = draw(0)
    assert torch.equal(first, draw(0))
    assert not torch.equal(first, draw(1))


def test_the_threshold_follows_the_schedule_from_noise_to_clean_image():
    amg = AMGConfig(threshold_start=1.6, threshold_end=1.4)
    values = guidance.threshold(amg, torch.linspace(0, 1, 11))
    assert values[0] == pytest.approx(1.6) and values[-1] == pytest.approx(1.4)
    assert (values.diff() < 0).all()
    assert not AMGConfig().enabled  # nothing changes unless asked


class TwoModes(nn.Module):
    """The exact denoiser (posterior mean) of a prior with two narrow modes: a training image, which
    plain sampling copies from about half of all starting noises, and an image not in the training
    set. A real module, not a trained one: its copies are certain and the test takes a second."""

    def __init__(self, modes: torch.Tensor, alphas_cumprod: torch.Tensor, spread: float = 0.05):
        super().__init__()
        self.modes = nn.Parameter(modes, requires_grad=False)
        self.register_buffer("alphas_cumprod", alphas_cumprod)
        self.spread = spread
        self.config = types.SimpleNamespace(in_channels=modes.shape[1], sample_size=modes.shape[-1])

    def forward(self, x, t):
        a = self.alphas_cumprod[t]
        var = a * self.spread ** 2 + 1 - a  # x_t's variance about sqrt(a) x mode
        diff = x.unsqueeze(1) - a.sqrt() * self.modes
        weights = torch.softmax(-diff.flatten(2).pow(2).sum(2) / (2 * var), dim=1)
        means = self.modes + self.spread ** 2 * a.sqrt() / var * diff
        x0 = (weights[..., None, None, None] * means).sum(1)
        return types.SimpleNamespace(sample=(x - a.sqrt() * x0) / (1 - a).sqrt())


def test_a_planted_copy_plain_sampling_makes_and_guided_sampling_does_not():
    scheduler = build_scheduler(arch(num_train_timesteps=100))
    images = torch.rand(61, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    train, unseen = images[:60], images[60:]
    model = TwoModes(torch.stack([train[0], unseen[0]]), scheduler.alphas_cumprod)

    def copies(samples):
        nl2 = guidance.normalized_l2_scores(samples, train)
        ratio = torch.from_numpy(metrics.memorization_scores(samples, train)["ratio"])
        assert torch.equal(nl2 < guidance.NL2_COPY, ratio < metrics.MEMORIZED_RATIO)  # both measures agree here
        return int((nl2 < guidance.NL2_COPY).sum())

    plain = sampling.sample(model, scheduler, 16, 20, seed=0, progress=False)
    guided = guidance.sample(model, scheduler, 16, 20, seed=0, progress=False, reference=train,
                             amg=AMGConfig(enabled=True, scale=3.0))
    assert copies(plain) >= 4
    assert copies(guided) == 0
    # guided samples went to the other mode (the model's own output), not off into noise
    assert (guided - unseen[0]).flatten(1).norm(dim=1).max() < 0.5 * (train[0] - unseen[0]).norm()


def test_a_model_evaluated_with_amg_is_named_as_its_own_variant():
    from pipeline import mitigation

    iet_agc_plus = {"iet.shards": "4", "agc.enabled": "True", "msr.enabled": "True", "taa.enabled": "True"}
    guided = {**iet_agc_plus, "amg.enabled": "True", "amg.scale": str(AMGConfig().scale)}
    assert mitigation.logged_variant(iet_agc_plus, "baseline") == "baseline"
    assert mitigation.logged_variant(guided, "baseline") == "AMG [sampling]"
    assert mitigation.logged_variant(guided, "iet") == "IET-AGC+ with AMG [sampling]"
    assert mitigation.logged_variant({**guided, "amg.scale": "4"}, "baseline") == "AMG [sampling] (scale=4.0)"


def test_the_sample_command_samples_with_amg_away_from_a_folder_of_images(tmp_path):
    from click.testing import CliRunner
    from PIL import Image

    from commands.cli import main
    from pipeline.core.models import save_pipeline

    save_pipeline(build_unet(arch(), 8, 1, 0), build_scheduler(arch()), tmp_path / "model")
    (tmp_path / "train").mkdir()
    pixels = torch.randint(0, 256, (3, 12, 12), generator=torch.Generator().manual_seed(0)).to(torch.uint8)
    for i, image in enumerate([*pixels, pixels[0]]):  # a duplicate: counted once
        Image.fromarray(image.numpy()).save(tmp_path / "train" / f"{i}.png")

    def run(*args):
        return CliRunner().invoke(main, ["sample", "--model", str(tmp_path / "model"), "--steps", "3", "--num", "3",
                                         "--out", str(tmp_path / "out"), *args])

    result = run("--guidance", "amg", "--train", str(tmp_path / "train"))
    assert result.exit_code == 0, result.output
    assert "3 unique training images" in result.output and len(list((tmp_path / "out").glob("*.png"))) == 3
    assert run("--guidance", "amg").exit_code == 2  # without its training images: a usage error
    (tmp_path / "bad.npz").write_bytes(b"not an npz")
    bad = run("--guidance", "amg", "--train", str(tmp_path / "bad.npz"))
    assert bad.exit_code == 1 and "bad.npz" in bad.output and "Traceback" not in bad.output


def test_the_evaluation_samples_with_amg_only_when_enabled_against_unique_training_images(tiny_model):
    from pipeline.evaluate import evaluation
    from pipeline.core.config import parse_params
    from pipeline.core.dedup import duplicate_groups
    from tiny import tiny

    unet, scheduler, images = tiny_model
    images = ((images + 1) * 127.5).round() / 127.5 - 1  # on the uint8 grid, as prepared sets are
    train = torch.cat([images, images[:3]])  # three images stored twice
    groups = duplicate_groups(((train + 1) * 127.5).round().to(torch.uint8).numpy())
    data = evaluation.EvalData(train, images[:4], images[4:], groups)
    assert evaluation.sampler(parse_params(tiny()), data) is sampling.sample
    always = parse_params(tiny(amg={"enabled": True, "threshold_start": 10.0, "threshold_end": 10.0}))
    draw = evaluation.sampler(always, data)
    assert len(draw.keywords["reference"]) == len(images)
    assert not torch.equal(draw(unet, scheduler, 2, 10, 0, progress=False),
                           sampling.sample(unet, scheduler, 2, 10, 0, progress=False))
