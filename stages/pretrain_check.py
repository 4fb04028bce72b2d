"""pretrain_check: the fine-tuning regime's pretrained model, checked before anything fine-tunes
from it (evaluation.glance): it should copy no training image (it never saw them), and its quality
is where the fine-tuned models' curves start. Its own stage, so that an evaluation parameter never
re-trains the pretrained model. With pretrain.enabled false it says only so."""
import click

from pipeline.core.config import load_params
from pipeline.core.io import read_json, write_json
from stages import params_option, path_option, stage


@click.command()
@params_option
@path_option("--pretrained", help="the pretrain stage's folder")
@path_option("--train", "train_path", help="prepared training set (.npz)")
@path_option("--heldout", "heldout_path", help="prepared held-out set (.npz)")
@path_option("--pool", "pool_path", help="prepared image pool (.npz)")
@path_option("--features", "features_dir", help="feature classifier (features stage)")
@path_option("--out", help="the check's metrics (.json)")
@stage
def main(params_path, pretrained, train_path, heldout_path, pool_path, features_dir, out):
    p = load_params(params_path)
    info = read_json(pretrained / "info.json")
    if not info.get("pretrained"):
        write_json(out, {"pretrained": False})
        return
    # here, not at the top: the default run (no pretraining) should not pay seconds of imports
    import torch

    from pipeline.core.data import ImageSet
    from pipeline.evaluate.evaluation import EvalData, glance
    from pipeline.evaluate.features import load_feature_net
    from pipeline.core.models import load_pipeline

    torch.set_num_threads(p.train.threads)
    unet, scheduler = load_pipeline(pretrained / "model")
    train, heldout, pool = (ImageSet.load(path) for path in (train_path, heldout_path, pool_path))
    data = EvalData.of(train, heldout, pool)
    check = glance(unet, scheduler, data, load_feature_net(features_dir), p)
    write_json(out, {**info, **check})
    click.echo(f"pretrained model: memorization ratio {check['mem_ratio']:.3f} of the training set "
               f"({check['distinct_copied']} images copied; held-out reference {check['heldout_mem_ratio']:.3f}), "
               f"FD {check['fd']:.2f}, KID {check['kid']:.4f}")


if __name__ == "__main__":
    main()
