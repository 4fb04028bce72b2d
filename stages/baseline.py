"""baseline: the fair baseline, the IET trainer with one shard and AGC/MSR/TAA off, trained for
the same optimizer steps x batch size as all IET proxies together."""
import click
import numpy as np

from pipeline.config import load_params, resolve_device
from pipeline.data import ImageSet
from pipeline.launch import check_pretrained, train_model
from pipeline.rounds import Plan
from stages import params_option, path_option, stage


@click.command()
@params_option
@path_option("--train", "train_path", help="prepared training set (.npz)")
@path_option("--out", help="folder of the model, its checkpoints (rounds/), curves and train_info.json")
@path_option("--resume", "state", help="folder of the resume state, kept while a run is unfinished")
@path_option("--pretrained", help="the pretrain stage's folder, which model.init_from may name (fine-tuning)")
@stage
def main(params_path, train_path, out, state, pretrained):
    p = load_params(params_path)
    resolve_device(p.train.device)  # an absent device fails here, before any work
    check_pretrained(p, pretrained)
    train = ImageSet.load(train_path)
    train_model("baseline", p, Plan.baseline(p), train, np.zeros(len(train), dtype=np.int64), out, state,
                data={"train": train_path})


if __name__ == "__main__":
    main()
