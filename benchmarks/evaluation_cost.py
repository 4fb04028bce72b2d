"""What each part of the evaluate stage costs on a trained run, against the final DDIM sampling
measured in the same process: the new measurements (membership inference, the per-image copy table,
FD/KID at every checkpoint) must stay a small share of the pipeline.

    python benchmarks/evaluation_cost.py [--run runs --model baseline --params params.yaml]

Needs a finished `dvc repro` (runs/<model>/model, runs/<model>/rounds, data/prepared, runs/features).
"""
import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.evaluate import privacy
from pipeline.compare.comparison import RESAMPLES, frontier_numbers
from pipeline.core.config import load_params
from pipeline.core.data import ImageSet
from pipeline.core.dedup import dedup_memorization_scores, duplicate_groups
from pipeline.evaluate.evaluation import LOSS_PAIRS, EvalData, copy_table, curve_over_training, reuses_final_samples
from pipeline.core.metrics import MEMORIZED_RATIO
from pipeline.evaluate.features import load_feature_net
from pipeline.core.layout import Rounds
from pipeline.core.models import load_pipeline
from pipeline.evaluate.sampling import sample


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default="runs", help="the runs/ folder of a finished pipeline")
    ap.add_argument("--data", default="data/prepared")
    ap.add_argument("--model", default="baseline", choices=["baseline", "iet"])
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args()
    p = load_params(args.params)
    torch.set_num_threads(p.train.threads)
    run = Path(args.run)
    unet, scheduler = load_pipeline(run / args.model / "model")
    train, heldout, pool = (ImageSet.load(f"{args.data}/{n}.npz") for n in ("train", "heldout", "pool"))
    data = EvalData(train.to_tensor(), heldout.to_tensor(), pool.to_tensor(), duplicate_groups(train.images))
    net = load_feature_net(run / "features/net")

    samples, t_sample = timed(lambda: sample(unet, scheduler, p.eval.num_samples, p.eval.ddim_steps, p.seeds.eval,
                                             p.eval.batch_size, progress=False))
    scores, t_scores = timed(lambda: dedup_memorization_scores(samples, data.train, data.groups))
    _, t_copies = timed(lambda: copy_table(unet, scheduler, scores, data, p.seeds.eval))
    members = data.train[torch.from_numpy(data.groups.representatives)]
    _, t_mia = timed(lambda: privacy.membership_inference(unet, scheduler, members, data.heldout, seed=p.seeds.eval,
                                                          pairs=LOSS_PAIRS))
    points = len(Rounds(run / args.model / "rounds").checkpoints(p.iet.rounds))
    held = np.asarray(dedup_memorization_scores(data.heldout, data.train, data.groups)["ratio"]) < MEMORIZED_RATIO
    last = samples if reuses_final_samples(p) else None
    (_, curve), t_curve = timed(lambda: curve_over_training(unet, scheduler, run / args.model / "rounds", data, net, p,
                                                            held, last))
    _, t_frontier = timed(lambda: frontier_numbers({"itself": [curve]}, [curve]))
    print(f"{args.model}: {p.eval.num_samples} samples, {len(members)} unique training images, "
          f"{points} checkpoints x {p.eval.curve_samples} samples (the last drawn again: "
          f"{not reuses_final_samples(p)}), {p.train.threads} thread(s), load average {os.getloadavg()[0]:.2f}")
    for name, t in (("final DDIM sampling (reference)", t_sample), ("memorization scores", t_scores),
                    ("per-image copy table (loss of each image)", t_copies),
                    ("membership inference (loss attack + PIA)", t_mia),
                    (f"curve: {points} checkpoints, memorization + FD/KID", t_curve),
                    ("  of which per checkpoint", t_curve / max(points, 1)),
                    (f"frontier comparison ({RESAMPLES} bootstraps, KID and FD)", t_frontier)):
        print(f"  {name:45s} {t:7.1f} s   {t / t_sample:5.2f} x sampling")


if __name__ == "__main__":
    main()
