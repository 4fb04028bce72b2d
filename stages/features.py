"""features: a small classifier trained on the real image pool, whose features give a fast
Frechet distance on a CPU (Inception FID is ~0.5 s an image here)."""
import click
import torch

from pipeline.config import load_params, resolve_device
from pipeline.data import ImageSet
from pipeline.features import save_feature_net, train_feature_net
from pipeline.io import write_json
from stages import params_option, stage


@click.command()
@params_option
@click.option("--pool", "pool_path", default="data/prepared/pool.npz", show_default=True)
@click.option("--out", default="runs/features", show_default=True)
@stage
def main(params_path, pool_path, out):
    p = load_params(params_path)
    device = resolve_device(p.train.device)
    torch.set_num_threads(p.train.threads)
    pool = ImageSet.load(pool_path)
    # the classifier trains on its images' device
    net, info = train_feature_net(pool.to_tensor().to(device), torch.from_numpy(pool.labels), p.data.channels,
                                  epochs=p.eval.classifier_epochs, seed=p.seeds.eval)
    save_feature_net(net.cpu(), f"{out}/net")
    write_json(f"{out}/info.json", info)
    click.echo(f"feature classifier: {info}")


if __name__ == "__main__":
    main()
