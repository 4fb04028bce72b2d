"""split: seeded assignment of training samples to the K shards of IET."""

import click

from pipeline.config import load_params
from pipeline.data import ImageSet
from pipeline.ensemble import split_shards
from pipeline.io import write_csv
from stages import params_option, path_option, stage


@click.command()
@params_option
@path_option("--train", "train_path", help="prepared training set (.npz)")
@path_option("--out", help="shard of every training sample (.csv)")
@stage
def main(params_path, train_path, out):
    p = load_params(params_path)
    train = ImageSet.load(train_path)
    shard = split_shards(train.labels, p.iet.shards, p.seeds.split)
    write_csv(out, [{"sample_id": i, "shard": s} for i, s in zip(train.ids.tolist(), shard.tolist())],
              ["sample_id", "shard"])
    click.echo(f"split {len(train)} samples into {p.iet.shards} shards")


if __name__ == "__main__":
    main()
