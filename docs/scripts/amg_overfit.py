"""AMG [sampling] on a model that copies: a small UNet overfitted on a handful of MNIST digits (the
project's own data preparation, `pipeline.core.data.prepare_splits`), sampled plain and with
anti-memorization guidance at a few strengths, same noise. Prints, per sampler, the project's
NN1/NN2 copy share, the paper's normalized-L2 share below 1.4 with its tail, the same for held-out
digits (the floor), the feature FD and KID against the real image pool as the evaluate stage
measures them (the project's small feature classifier, trained on that pool; held-out digits give
the reference FD), the mean pixel change from the plain samples and the time.

    OMP_NUM_THREADS=1 python docs/scripts/amg_overfit.py [--images 16 --steps 3000 --scales 1 2 4]

Minutes on a CPU; a training step costs the same with or without guidance, so only sampling differs.
"""
import argparse
import time

import torch

from pipeline.evaluate import guidance, sampling

from pipeline.core import metrics
from pipeline.core.config import AMGConfig, DataConfig, Duplicates, ModelConfig
from pipeline.core.data import prepare_splits
from pipeline.evaluate.features import extract_features, train_feature_net
from pipeline.core.models import build_scheduler, build_unet


def overfit(train: torch.Tensor, steps: int, timesteps: int):
    """A (32, 64)-channel UNet trained on `train` alone (the eps objective) for `steps` steps of 32."""
    cfg = ModelConfig(block_out_channels=[32, 64], attention=False, num_train_timesteps=timesteps)
    unet, scheduler = build_unet(cfg, train.shape[-1], train.shape[1], seed=0), build_scheduler(cfg)
    opt = torch.optim.Adam(unet.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x0 = train[torch.randint(0, len(train), (32,), generator=g)]
        noise, t = torch.randn(x0.shape, generator=g), torch.randint(0, timesteps, (32,), generator=g)
        loss = (unet(scheduler.add_noise(x0, noise, t), t).sample - noise).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return unet.eval(), scheduler


def describe(name: str, samples: torch.Tensor, train: torch.Tensor, seconds: float, plain: torch.Tensor,
             quality) -> None:
    nl2 = guidance.normalized_l2_scores(samples, train)
    copies = (metrics.memorization_scores(samples, train)["ratio"] < metrics.MEMORIZED_RATIO).mean()
    tail = guidance.nl2_summary(nl2)
    print(f"{name:>16}: NN1/NN2 copies {copies:.3f} | nL2 < 1.4 {tail['nl2_copy_share']:.3f}, 5th pct "
          f"{tail['nl2_p5']:.2f}, min {tail['nl2_min']:.2f}, median {float(nl2.median()):.2f} | "
          f"{quality(samples)} | mean |x - plain| {float((samples - plain).abs().mean()):.3f} | {seconds:.1f} s")


def quality_against(net, real: torch.Tensor):
    """'FD x, KID y' of samples against `real` in the feature classifier's space."""
    f_real = extract_features(net, real)

    def measure(samples: torch.Tensor) -> str:
        f = extract_features(net, samples)
        return (f"FD {metrics.frechet_distance(f, f_real):.2f}, "
                f"KID {metrics.kernel_inception_distance(f, f_real):.3f}")
    return measure


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--resolution", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--timesteps", type=int, default=100)
    ap.add_argument("--ddim-steps", type=int, default=20)
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--scales", type=float, nargs="+", default=[1.0, 2.0, 4.0])
    args = ap.parse_args()
    torch.set_num_threads(1)
    data = DataConfig(train_size=args.images, heldout_size=64, resolution=args.resolution,
                      duplicates=Duplicates(images=0))
    splits = prepare_splits(data, seed=0)
    train, heldout = splits.train.to_tensor(), splits.heldout.to_tensor()
    unet, scheduler = overfit(train, args.steps, args.timesteps)
    pool = splits.pool.to_tensor()
    net, _ = train_feature_net(pool, torch.from_numpy(splits.pool.labels), pool.shape[1], epochs=3, seed=0,
                               progress=False)
    quality = quality_against(net, pool)

    start = time.perf_counter()
    plain = sampling.sample(unet, scheduler, args.samples, args.ddim_steps, 0, progress=False)
    describe("plain DDIM", plain, train, time.perf_counter() - start, plain, quality)
    describe("held-out digits", heldout, train, 0.0, heldout, quality)
    for scale in args.scales:
        start = time.perf_counter()
        guided = guidance.sample(unet, scheduler, args.samples, args.ddim_steps, 0, progress=False, reference=train,
                                 amg=AMGConfig(enabled=True, scale=scale))
        describe(f"AMG scale {scale:g}", guided, train, time.perf_counter() - start, plain, quality)


if __name__ == "__main__":
    main()
