"""fid_reference: Inception features of the training set, computed once for every evaluation.

Writes `reference.safetensors` (torchmetrics' real-side FID sums and KID features) and `info.json`,
including the held-out images' FID/KID against the training set: the value a model that generalises
perfectly would get at this sample size.  With Inception off (eval.inception false, or auto on a
machine without CUDA) only `info.json` is written, saying so, and the evaluations skip FID.
"""

import click
import torch

from pipeline.evaluate import inception
from pipeline.core.config import load_params, resolve_device
from pipeline.core.data import ImageSet
from pipeline.core.io import write_json
from stages import params_option, path_option, stage

STATS = "reference.safetensors"
INFO = "info.json"


@click.command()
@params_option
@path_option("--train", "train_path", help="prepared training set (.npz)")
@path_option("--heldout", "heldout_path", help="prepared held-out set (.npz)")
@path_option("--out", help=f"folder of {STATS} and {INFO}")
@stage
def main(params_path, train_path, heldout_path, out):
    p = load_params(params_path)
    resolve_device(p.train.device)  # an absent device fails here, before any work
    if not inception.resolve(p.eval.inception):
        out.mkdir(parents=True, exist_ok=True)
        (out / STATS).unlink(missing_ok=True)
        write_json(out / INFO, {"inception": False, "setting": p.eval.inception,
                                "reason": "eval.inception is false" if p.eval.inception is False
                                else "eval.inception is auto and no CUDA device is present"})
        click.echo("Inception FID off: wrote the marker only")
        return

    torch.set_num_threads(p.train.threads)
    train = ImageSet.load(train_path).to_tensor()
    heldout = ImageSet.load(heldout_path).to_tensor()
    device = str(resolve_device(p.train.device))
    quality = inception.InceptionQuality(inception.InceptionFeatures().to(device))
    quality.update(train, real=True)
    quality.update(heldout, real=False)
    held = quality.compute(seed=p.seeds.eval)
    out.mkdir(parents=True, exist_ok=True)
    quality.save_real(out / STATS)
    write_json(out / INFO, {"inception": True, "setting": p.eval.inception, "train_images": len(train),
                            "weights": str(inception.WEIGHTS_FILE), "device": device,
                            **{f"heldout_{k}": v for k, v in held.items()}})
    click.echo(f"Inception reference: {len(train)} training images; held-out FID {held['fid']:.2f}")


if __name__ == "__main__":
    main()
