"""features: a small classifier trained on the real image pool, whose features give a fast
Frechet distance on a CPU (Inception FID is ~0.5 s an image here)."""
import click
import torch

from pipeline.core.config import load_params, resolve_device
from pipeline.core.data import ImageSet
from pipeline.evaluate.features import save_feature_net, train_feature_net
from pipeline.core.io import write_json
from stages import params_option, path_option, stage


@click.command()
@params_option
@path_option("--pool", "pool_path", help="prepared image pool (.npz)")
@path_option("--net", "net_dir", help="folder the classifier is saved in")
@path_option("--info", "info_path", help="its training summary (.json)")
@stage
def main(params_path, pool_path, net_dir, info_path):
    p = load_params(params_path)
    device = resolve_device(p.train.device)
    torch.set_num_threads(p.train.threads)
    pool = ImageSet.load(pool_path)
    # the classifier trains on its images' device
    net, info = train_feature_net(pool.to_tensor().to(device), torch.from_numpy(pool.labels), p.data.channels,
                                  epochs=p.eval.classifier_epochs, seed=p.seeds.eval)
    save_feature_net(net.cpu(), net_dir)
    write_json(info_path, info)
    click.echo(f"feature classifier: {info}")


if __name__ == "__main__":
    main()
