"""prepare: materialize the dataset as versioned files (train subset, held-out reference, pool)."""

import click
import numpy as np

from pipeline.core.config import load_params
from pipeline.core.data import prepare_splits
from pipeline.core.dedup import duplicate_groups, near_copy_report
from pipeline.core.io import staged_folder, write_csv, write_json
from stages import params_option, path_option, stage


@click.command()
@params_option
@path_option("--out", help="folder of train.npz, heldout.npz, pool.npz, info.json (and copy_of.csv)")
@stage
def main(params_path, out):
    p = load_params(params_path)
    splits = prepare_splits(p.data, p.seeds.data)  # everything is read and checked before anything is written
    info = {name: len(getattr(splits, name)) for name in ("train", "heldout", "pool")}
    # pixel-identical training images: copies concentrate on them, and every memorization score is
    # taken against one image per group (evaluate logs the same counts to MLflow)
    dup = duplicate_groups(splits.train.images).summary()
    src = splits.source_duplicates  # the source's own, each group dealt whole to one side of the split
    with staged_folder(out) as staged:  # all of the files or none: a full disk left train.npz without pool.npz
        for name in ("train", "heldout", "pool"):
            getattr(splits, name).save(f"{staged}/{name}.npz")
        added = (_added_duplicates(splits, f"{staged}/copy_of.csv", p.data.duplicates.near)
                 if p.data.duplicates.images else {})
        write_json(f"{staged}/info.json", {**info, "source": p.data.source, "resolution": p.data.resolution,
                                           "channels": p.data.channels, "train_duplicates": dup,
                                           "source_duplicates": src, **added})
    click.echo(f"prepared {info} from {p.data.source} at {p.data.resolution}px")
    if src["groups"]:
        click.echo(f"the source holds {src['groups']} groups of exact duplicates ({src['images']} images), none split: "
                   f"{src['train']} in train (every copy), {src['heldout']} held out (one image each), "
                   f"{src['pool_only']} in the pool only, {src['none']} in no split")
    if dup["duplicate_groups"]:
        click.echo(f"the training set holds exact duplicates: {dup['duplicate_groups']} images occur more than "
                   f"once ({dup['duplicated_samples']} samples; the largest group has {dup['largest_group']}); "
                   f"{dup['unique_images']} unique images")
    if "near_copies" in added:
        near, t = added["near_copies"], added["near_copies"]["thresholds"]
        found = (f"a threshold t with {t['catch_above']:.4f} < t <= {t['merges_at']:.4f} catches every copy and "
                 "merges no distinct images" if t["any_works"] else "any threshold that catches every copy merges "
                 "distinct images")
        click.echo(f"near copies lie {near['rms_to_original']['median']:.4f} (median; max "
                   f"{near['rms_to_original']['max']:.4f}) from their originals, distinct images at least "
                   f"{near['distinct_images']['min']:.4f} apart (RMS): for near_duplicate, {found}")


def _added_duplicates(splits, path: str, near: bool) -> dict:
    """data.duplicates' copies: copy_of.csv (each added sample's id and the id of its original) and
    their counts for info.json (written only when there are any, so that without them the prepared
    data is what it always was); with `near` copies, how near (_near_copies)."""
    new = splits.train.ids != splits.copy_of
    write_csv(path, [{"sample_id": i, "copy_of": c} for i, c in
                     zip(splits.train.ids[new].tolist(), splits.copy_of[new].tolist())], ["sample_id", "copy_of"])
    added = {"images": len(set(splits.copy_of[new].tolist())), "extra_samples": int(new.sum())}
    return {"added_duplicates": added, **({"near_copies": _near_copies(splits)} if near else {})}


def _near_copies(splits) -> dict:
    """dedup.near_copy_report with ids for positions: each near copy's RMS distance to its original,
    distinct images' distances, and the near_duplicate thresholds that catch every copy and merge no
    distinct images."""
    ids = splits.train.ids
    position = {i: p for p, i in enumerate(ids.tolist())}
    report = near_copy_report(splits.train.images, np.array([position[i] for i in splits.copy_of.tolist()]))
    report["copies"] = [{"sample_id": int(ids[c["position"]]), "copy_of": int(ids[c["original"]]), "rms": c["rms"]}
                        for c in report["copies"]]
    return report


if __name__ == "__main__":
    main()
