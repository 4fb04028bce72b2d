"""validate: check every parameter before DVC touches any output. DVC deletes a stage's outputs
before running it, so a bad value found by the stage itself would already have cost its trained
model; every stage depends on this one, which runs first. Its output is a fixed marker, the same
for all valid params, so that a valid change re-runs only the stages that read the changed key."""
import click

from pipeline.core.config import load_params
from pipeline.train.dag import check as check_rounds
from pipeline.core.io import atomic_path
from pipeline.train.preflight import check_machine
from pipeline.core.store import check_tracking
from stages import params_option, path_option, stage

MARKER = "params.yaml is valid\n"


@click.command()
@params_option
@path_option("--pipeline", "dvc_yaml", help="dvc.yaml, whose round stages must be those of iet.rounds")
@path_option("--out", help="the marker written when the params are valid")
@stage
def main(params_path, dvc_yaml, out):
    params = load_params(params_path)
    check_rounds(dvc_yaml, params.iet.rounds)  # else DVC would run the rounds dvc.yaml lists, in silence
    check_tracking(params.tracking)  # a store MLflow would fail on, after training
    check_machine(params)  # a launcher that is not there, a run that cannot fit in memory
    with atomic_path(out) as tmp:
        tmp.write_text(MARKER)
    click.echo(f"{params_path}: valid")


if __name__ == "__main__":
    main()
