"""aggregate: one round's average of a model's proxies (weights, EMA and each mid-round checkpoint),
weighted by shard size, from its train stage's folder. Needs neither diffusers nor the params."""
import click

from pipeline.train.ensemble import average_round
from stages import path_option, stage


@click.command()
@path_option("--trained", help="the round's train folder")
@path_option("--out", help="the round's aggregate folder")
@stage
def main(trained, out):
    average_round(trained, out)


if __name__ == "__main__":
    main()
