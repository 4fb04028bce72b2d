"""baseline: the fair baseline, the IET trainer with one shard and AGC/MSR/TAA off, trained for
the same optimizer steps x batch size as all IET proxies together."""
import click
import numpy as np

from pipeline.config import load_params, resolve_device
from pipeline.data import ImageSet
from pipeline.launch import train_model
from pipeline.rounds import Plan
from stages import params_option, stage


@click.command()
@params_option
@click.option("--train", "train_path", default="data/prepared/train.npz", show_default=True)
@click.option("--out", default="runs/baseline", show_default=True)
@stage
def main(params_path, train_path, out):
    p = load_params(params_path)
    resolve_device(p.train.device)  # an absent device fails here, before any work
    train = ImageSet.load(train_path)
    train_model("baseline", p, Plan.baseline(p), train, np.zeros(len(train), dtype=np.int64), out,
                data={"train": train_path})


if __name__ == "__main__":
    main()
