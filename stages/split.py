"""split: seeded assignment of training samples to the K shards of IET."""

import click
import numpy as np

from pipeline.core.config import load_params
from pipeline.core.data import ImageSet
from pipeline.core.dedup import duplicate_groups, near_duplicate_groups
from pipeline.train.ensemble import split_shards
from pipeline.core.io import write_csv, write_json
from stages import params_option, path_option, stage


@click.command()
@params_option
@path_option("--train", "train_path", help="prepared training set (.npz)")
@path_option("--out", help="shard of every training sample (.csv)")
@path_option("--groups", "groups_path", help="exact and near-duplicate groups of the training set (.json)")
@stage
def main(params_path, train_path, out, groups_path):
    p = load_params(params_path)
    train = ImageSet.load(train_path)
    near = near_duplicate_groups(train.images, p.iet.near_duplicate)
    groups = near if p.iet.split == "groups" else None
    shard = split_shards(train.labels, p.iet.shards, p.seeds.split, None if groups is None else groups.group)
    write_csv(out, [{"sample_id": i, "shard": s} for i, s in zip(train.ids.tolist(), shard.tolist())],
              ["sample_id", "shard"])
    # what iet.near_duplicate joins beyond the pixel-identical copies, whichever split is on
    write_json(groups_path, {"near_duplicate": p.iet.near_duplicate, "exact": duplicate_groups(train.images).summary(),
                             "near": near.summary()})
    where = _where(groups, shard) if groups is not None else ""
    click.echo(f"split {len(train)} samples into {p.iet.shards} shards{where}")


def _where(groups, shard) -> str:
    """Where the duplicate groups went: each whole in one shard."""
    dup = np.flatnonzero(groups.sizes > 1)
    per_shard = np.bincount(shard[groups.representatives[dup]], minlength=shard.max() + 1)
    return (f", {len(dup)} groups of near duplicates ({int(groups.sizes[dup].sum())} samples) kept whole: "
            f"{per_shard.tolist()} groups per shard")


if __name__ == "__main__":
    main()
