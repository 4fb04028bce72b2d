"""The extra sampling time of anti-memorization guidance (pipeline/evaluate/guidance.py) against plain DDIM
(pipeline/evaluate/sampling.py), both in this process on the same model, noise and machine, taking turns.

Two guided cases bound the cost: `inactive` (every step runs the UNet with autograd on and queries
the nearest training images, but no estimate is near enough to be guided: the cost a sample that
copies nothing pays) and `active` (every sample guided at every step: a backward pass through the
UNet too, the worst case). A real run lies in between, near `inactive`, as only would-be copies
are guided. The model is params.yaml's architecture, untrained (timing does not depend on the
weights); the reference is random images as many as data.train_size.

    python benchmarks/guidance_cost.py [--samples 64 --steps 50 --repeats 5 --threads 1]

On a shared machine the ratio of medians is the figure to read (the turns spread the load alike).
"""
import argparse
import os
import statistics

import torch

from nn_search import all_times
from pipeline.evaluate import guidance, sampling
from pipeline.core.config import AMGConfig, load_params
from pipeline.core.models import build_scheduler, build_unet

CASES = {"inactive": AMGConfig(enabled=True, threshold_start=1e-6, threshold_end=1e-6),
         "active": AMGConfig(enabled=True, threshold_start=10.0, threshold_end=10.0)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    p = load_params(args.params)
    res, ch = p.data.resolution, p.data.channels
    unet = build_unet(p.model, res, ch, seed=0).to(args.device)
    scheduler = build_scheduler(p.model)
    reference = torch.rand(p.data.train_size, ch, res, res, generator=torch.Generator().manual_seed(0)) * 2 - 1

    def plain():
        sampling.sample(unet, scheduler, args.samples, args.steps, 0, progress=False)

    def guided(amg):
        return lambda: guidance.sample(unet, scheduler, args.samples, args.steps, 0, progress=False,
                                       reference=reference, amg=amg)

    print(f"{args.samples} samples x {args.steps} DDIM steps, {res}x{res}x{ch}, reference {len(reference)} images, "
          f"{args.threads} threads on {args.device}, load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    times = all_times([plain, *(guided(amg) for amg in CASES.values())], args.repeats)
    base = statistics.median(times[0])
    print(f"plain DDIM: median {base:.2f} s")
    for name, ts in zip(CASES, times[1:]):
        print(f"AMG {name}: median {statistics.median(ts):.2f} s, x{statistics.median(ts) / base:.2f} plain DDIM")


if __name__ == "__main__":
    main()
