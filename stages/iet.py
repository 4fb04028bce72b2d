"""iet: the round loop of IET-AGC+ (proxies train on their shards, are averaged, samples are
profiled and redistributed), from the shard assignment of the split stage."""
import click

from pipeline.config import load_params, resolve_device
from pipeline.data import ImageSet
from pipeline.launch import read_shards, train_model
from pipeline.rounds import Plan
from stages import params_option, stage


@click.command()
@params_option
@click.option("--train", "train_path", default="data/prepared/train.npz", show_default=True)
@click.option("--shards", "shards_path", default="runs/split/shards.csv", show_default=True)
@click.option("--out", default="runs/iet", show_default=True)
@stage
def main(params_path, train_path, shards_path, out):
    p = load_params(params_path)
    resolve_device(p.train.device)  # an absent device fails here, before any work
    train = ImageSet.load(train_path)
    train_model("iet", p, Plan.iet(p), train, read_shards(shards_path, train), out,
                data={"train": train_path})


if __name__ == "__main__":
    main()
