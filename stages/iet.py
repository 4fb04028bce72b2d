"""iet: the round loop of IET-AGC+ (proxies train on their shards, are averaged, samples are
profiled and redistributed), from the shard assignment of the split stage."""
import click

from pipeline.config import load_params, resolve_device
from pipeline.data import ImageSet
from pipeline.launch import check_pretrained, read_shards, train_model
from pipeline.rounds import Plan
from stages import params_option, path_option, stage


@click.command()
@params_option
@path_option("--train", "train_path", help="prepared training set (.npz)")
@path_option("--shards", "shards_path", help="initial shard of every training sample (split stage)")
@path_option("--out", help="folder of the model, its rounds (checkpoints, loss tables, moves), curves and train_info.json")
@path_option("--resume", "state", help="folder of the resume state, kept while a run is unfinished")
@path_option("--pretrained", help="the pretrain stage's folder, which model.init_from may name (fine-tuning)")
@stage
def main(params_path, train_path, shards_path, out, state, pretrained):
    p = load_params(params_path)
    resolve_device(p.train.device)  # an absent device fails here, before any work
    check_pretrained(p, pretrained)
    train = ImageSet.load(train_path)
    train_model("iet", p, Plan.iet(p), train, read_shards(shards_path, train, p.iet.shards), out,
                state, data={"train": train_path})


if __name__ == "__main__":
    main()
