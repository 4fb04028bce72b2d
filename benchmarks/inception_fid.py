"""Inception FID and KID of finished runs' final samples against their training set, for when the
pipeline ran with Inception off (eval.inception auto on a CPU): the standard network, scored after
the fact on the samples the evaluate stage saved, with the held-out real images' FID as the floor
a perfect generator gets at this sample size. On a 2-core CPU an image costs ~0.5 s.

    dvc exp apply def-s0      # or any run: its data/prepared and runs/eval/*/samples.npz
    python benchmarks/inception_fid.py runs/eval/baseline/samples.npz runs/eval/iet/samples.npz
"""
import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.core.data import ImageSet
from pipeline.evaluate.inception import InceptionFeatures, InceptionQuality


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("samples", nargs="+", type=Path, help="samples.npz files the evaluate stage wrote")
    ap.add_argument("--data", default="data/prepared", help="train.npz and heldout.npz of the same run")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0, help="KID's subset draws")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    features = InceptionFeatures()
    reference = InceptionQuality(features)
    reference.update(ImageSet.load(f"{args.data}/train.npz").to_tensor(), real=True)
    reference.update(ImageSet.load(f"{args.data}/heldout.npz").to_tensor(), real=False)
    rows = [("held-out real images", reference.compute(seed=args.seed))]
    with tempfile.TemporaryDirectory() as tmp:
        reference.save_real(Path(tmp) / "real.safetensors")
        for path in args.samples:
            quality = InceptionQuality(features)
            quality.load_real(Path(tmp) / "real.safetensors")
            images = torch.from_numpy(np.load(path)["images"]).float() / 127.5 - 1  # uint8 -> [-1, 1]
            quality.update(images, real=False)
            rows.append((str(path), quality.compute(seed=args.seed)))
    print(f"| images | Inception FID | Inception KID |\n|---|---|---|")
    for name, s in rows:
        print(f"| {name} | {s['fid']:.1f} | {s['kid']:.4f} ± {s['kid_std']:.4f} |")
    print(f"({time.perf_counter() - start:.0f} s, {args.threads} threads)")


if __name__ == "__main__":
    main()
