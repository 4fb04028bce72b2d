"""train: one round's training stage of a model (baseline | iet): every proxy trains on its shard,
from the state the previous round's stages left (pipeline/train/rounds.py)."""
import click

from stages import round_option, round_stage_options, stage


@click.command()
@round_stage_options
@round_option
@stage
def main(model, rnd, **paths):
    from pipeline.train.launch import run_round_stage

    run_round_stage(model, "train", rnd, **paths)


if __name__ == "__main__":
    main()
