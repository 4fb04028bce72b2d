"""The verdict protocol (pipeline/compare/verdict.py) on synthetic runs of known truth: how often it calls a
true null better or worse (goal: at most 6%, with its Clopper-Pearson interval) and how often it
finds a real difference of 1 and 2 seed-to-seed standard deviations, at several seed designs.

Each synthetic run is one training seed: 8 checkpoints whose quality improves with training and
whose copying grows with it; the seed moves its whole curve (sd --seed-sd, 0.046 at matched KID as
measured on the project's benchmark runs), noise shared by every checkpoint of the run moves it
again (every checkpoint is sampled from the same noise, seeds.eval), then each checkpoint's copies
among its samples are binomial. The runs go through the same fit, frontier, per-seed scores, tests
and words as every real comparison (verdict.compare_seeds, verdict.word).

    python benchmarks/verdict_calibration.py [--sims 400] [--json out.json]
"""
import argparse
import json
import time

import numpy as np
import scipy.special
import scipy.stats

from pipeline.compare import verdict
from pipeline.evaluate.frontier import fit_run

PROGRESS = np.linspace(0.125, 1.0, 8)
DESIGNS = ((3, 6), (6, 6), (3, 3), (8, 10))
CALLED = (verdict.BETTER, verdict.WORSE, verdict.BELOW_FLOOR_BOUND)


def simulated_run(rng: np.random.Generator, offset: float, seed_sd: float, shared_sd: float, samples: int,
                  base: float = 0.05, slope: float = 0.12):
    """One seed's fitted checkpoints (see the module's docstring)."""
    level = base + offset + rng.normal(0, seed_sd) + rng.normal(0, shared_sd)
    rate = np.clip(level + slope * PROGRESS, 0, 1)
    memorization = rng.binomial(samples, rate) / samples
    quality = 1.5 * (1.1 - PROGRESS) * np.exp(rng.normal(0, 0.05)) + rng.normal(0, 0.01, len(PROGRESS))
    return fit_run(memorization, quality, [samples] * len(PROGRESS))


def called_rate(rng, design, effect_sd, args) -> tuple[int, int]:
    """(comparisons called better/worse, simulations) with the model's seeds shifted by effect_sd
    seed-sd (0: the null)."""
    called = 0
    for _ in range(args.sims):
        model = [simulated_run(rng, -effect_sd * args.seed_sd, args.seed_sd, args.shared_sd, args.samples)
                 for _ in range(design[0])]
        base = [simulated_run(rng, 0.0, args.seed_sd, args.shared_sd, args.samples) for _ in range(design[1])]
        words = verdict.word(verdict.compare_seeds(model, base, samples=[args.samples] * sum(design)))
        called += words in (CALLED if effect_sd == 0 else (verdict.BETTER, verdict.BELOW_FLOOR_BOUND))
    return called, args.sims


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sims", type=int, default=400, help="simulated comparisons per cell")
    ap.add_argument("--seed-sd", type=float, default=0.046, help="seed-to-seed sd of a run's copying")
    ap.add_argument("--shared-sd", type=float, default=0.01, help="sampling noise shared by a run's checkpoints")
    ap.add_argument("--samples", type=int, default=256, help="generated samples a checkpoint")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    start, rows = time.perf_counter(), []
    for design in DESIGNS:
        row = {"model_seeds": design[0], "baseline_seeds": design[1],
               "least_p": 2 / scipy.special.comb(sum(design), design[0], exact=True)}
        for name, effect in (("false", 0.0), ("power_1sd", 1.0), ("power_2sd", 2.0)):
            hits, n = called_rate(rng, design, effect, args)
            low, high = scipy.stats.binomtest(hits, n).proportion_ci(0.95)
            row.update({name: hits / n, f"{name}_low": low, f"{name}_high": high})
        rows.append(row)
        print(f"{design[0]} vs {design[1]}: false {row['false']:.3f} [{row['false_low']:.3f}, {row['false_high']:.3f}]"
              f"  power 1 sd {row['power_1sd']:.2f}  2 sd {row['power_2sd']:.2f}  (least p {row['least_p']:.4f})",
              flush=True)
    out = {"args": vars(args), "rows": rows, "seconds": time.perf_counter() - start,
           "seeds_for_80pct_power": {d: verdict.seeds_for_power(d) for d in (1.0, 1.5, 2.0)}}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
