"""finish: a model's outputs after its last round: the final model (raw averaged weights and EMA),
its training curves and train_info.json."""
import click

from stages import path_option, round_stage_options, stage


@click.command()
@round_stage_options
@path_option("--out", help="folder of model/, model_ema/, curves.csv and train_info.json")
@stage
def main(model, out, **paths):
    from pipeline.train.launch import run_round_stage

    run_round_stage(model, "finish", None, out=out, **paths)


if __name__ == "__main__":
    main()
