"""profile: one round's end for a model: with several shards, the loss table under the proxies'
end-of-round weights, the mitigations' round end and MSR's moves, the next round's shards."""
import click

from stages import round_option, round_stage_options, stage


@click.command()
@round_stage_options
@round_option
@stage
def main(model, rnd, **paths):
    from pipeline.train.launch import run_round_stage

    run_round_stage(model, "profile", rnd, **paths)


if __name__ == "__main__":
    main()
