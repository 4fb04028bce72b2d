"""Training throughput of IET-AGC+ (the whole round loop: AGC masking and bank, TAA, loss
profiling, redistribution, averaging, per-round checkpoints) against a plain diffusers-style
training loop on the same UNet and batch, both measured in this process.

    python benchmarks/train_throughput.py [--params params.yaml] [--rounds 1] [--local-epochs E] [--train-size N] [--repeats 3]

Each repeat times the plain loop, the round loop, then the plain loop again, and takes the ratio to
the mean of the two plain runs (so a slow spell of a shared machine hits both sides); the median
ratio of the repeats and its spread (min-max) is the figure to report.

Defaults: one round at the params' local epochs, so per-round costs (profiling, redistribution,
checkpoints) weigh as much as in a real run.
"""
import json
import tempfile
from pathlib import Path
import time

import click
import numpy as np
import torch
from diffusers.training_utils import EMAModel

from pipeline.train import rounds
from pipeline.core.config import load_params
from pipeline.core.data import prepare_splits
from pipeline.train.ensemble import split_shards
from pipeline.core.models import build_scheduler, build_unet


def plain_loop(params, images, steps):
    """What a user would write without this project: sample, noise, MSE, Adam, clip, EMA."""
    model = build_unet(params.model, params.data.resolution, params.data.channels, 0)
    sched = build_scheduler(params.model)
    opt = torch.optim.Adam(model.parameters(), lr=params.train.lr)
    ema = EMAModel(model.parameters(), decay=params.train.ema_decay)
    g = torch.Generator().manual_seed(0)
    b = params.train.batch_size
    start = time.perf_counter()
    for _ in range(steps):
        x0 = images[torch.randint(0, len(images), (b,), generator=g)]
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, sched.config.num_train_timesteps, (b,), generator=g)
        loss = torch.nn.functional.mse_loss(model(sched.add_noise(x0, noise, t), t).sample, noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), params.train.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema.step(model.parameters())
    return steps * b / (time.perf_counter() - start)


def _iet_run(p, plan, train, steps):
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        rounds.run(p, plan, train, split_shards(train.labels, plan.shards, p.seeds.split), f"{tmp}/out", f"{tmp}/state")
        iet = steps * p.train.batch_size / (time.perf_counter() - start)
        per_round = [json.loads(f.read_text()) for f in sorted(Path(tmp).glob("out/rounds/*/round.json"))]
    return iet, per_round


@click.command()
@click.option("--params", "params_path", default="params.yaml")
@click.option("--rounds", "n_rounds", default=1, show_default=True)
@click.option("--local-epochs", default=None, type=float, help="default: iet.local_epochs")
@click.option("--train-size", default=None, type=int, help="default: data.train_size")
@click.option("--repeats", default=3, show_default=True, type=click.IntRange(min=1))
def main(params_path, n_rounds, local_epochs, train_size, repeats):
    base = load_params(params_path)
    p = base.model_copy(update={
        "iet": base.iet.model_copy(update={"rounds": n_rounds, "local_epochs": local_epochs or base.iet.local_epochs}),
        "data": base.data.model_copy(update={"train_size": train_size or base.data.train_size})})
    torch.set_num_threads(p.train.threads)
    train = prepare_splits(p.data, p.seeds.data).train
    images = train.to_tensor()
    plan = rounds.Plan.iet(p)
    steps = plan.shards * plan.rounds * plan.steps_per_round
    print(f"{plan}; {steps} optimizer steps of batch {p.train.batch_size}, {torch.get_num_threads()} threads")

    plain_loop(p, images, 5)  # warm-up: first-call allocations
    ratios = []
    for r in range(repeats):
        plain = [plain_loop(p, images, steps)]
        iet, per_round = _iet_run(p, plan, train, steps)
        plain.append(plain_loop(p, images, steps))
        ref = float(np.mean(plain))
        ratios.append(iet / ref)
        print(f"repeat {r + 1}: plain {ref:8.1f} images/s (runs: {', '.join(f'{x:.1f}' for x in plain)}), "
              f"IET-AGC+ {iet:8.1f} images/s (everything included): ratio {iet / ref:.3f}")
    print(f"ratio IET-AGC+ / plain = {np.median(ratios):.3f} median of {repeats}, spread "
          f"{min(ratios):.3f}-{max(ratios):.3f}  (goal >= 0.95)")
    # A local epoch: every proxy once over its own shard, i.e. N training images in all.
    epoch = sum(r["round_train_seconds"] for r in per_round) / (p.iet.local_epochs * len(per_round))
    profile = [r.get("profile_seconds", 0.0) for r in per_round]
    print(f"loss profile    : {np.mean(profile):.3f} s a round = {np.mean(profile) / epoch:.2f} local epochs "
          f"(by round: {', '.join(f'{x / epoch:.2f}' for x in profile)}; msr.profile={p.msr.profile}, "
          f"{p.msr.profile_timesteps} pairs; a local epoch, {p.data.train_size} images, takes {epoch:.3f} s)")


if __name__ == "__main__":
    main()
