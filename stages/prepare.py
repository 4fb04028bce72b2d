"""prepare: materialize the dataset as versioned files (train subset, held-out reference, pool)."""
import click

from pipeline.config import load_params
from pipeline.data import prepare_splits
from pipeline.io import write_json
from stages import params_option, stage


@click.command()
@params_option
@click.option("--out", default="data/prepared", show_default=True)
@stage
def main(params_path, out):
    p = load_params(params_path)
    splits = prepare_splits(p.data, p.seeds.data)  # everything is read and checked before anything is written
    for name in ("train", "heldout", "pool"):
        getattr(splits, name).save(f"{out}/{name}.npz")
    info = {name: len(getattr(splits, name)) for name in ("train", "heldout", "pool")}
    write_json(f"{out}/info.json", {**info, "source": p.data.source, "resolution": p.data.resolution,
                                    "channels": p.data.channels})
    click.echo(f"prepared {info} from {p.data.source} at {p.data.resolution}px")


if __name__ == "__main__":
    main()
