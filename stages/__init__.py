"""One thin click command per DVC stage; each runs on its own as `python -m stages.<name>`."""
from __future__ import annotations

import functools
import sys
from pathlib import Path

import click

from pipeline.config import ConfigError, load_params

# Stages that log to MLflow: they check the tracking server before any work, so that a dead one
# costs seconds, not a trained model (MLflow would retry it for minutes, at the end).
# By file name: under `python -m stages.iet` the module is called __main__.
TRACKED = {"pretrain", "baseline", "iet", "evaluate", "report", "register"}


def stage(fn):
    """Turn the errors a user can fix (bad params, bad data, missing inputs, unreachable tracking
    server, a diverged or out-of-memory training step) into one clear message and exit code 1,
    without a traceback; on any failure, mark the MLflow runs the stage opened as failed."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from mlflow.exceptions import MlflowException

        from pipeline.data import DataError
        try:
            if Path(fn.__code__.co_filename).stem in TRACKED and "params_path" in kwargs:
                from pipeline.store import check_tracking

                check_tracking(load_params(kwargs["params_path"]).tracking)
            result = fn(*args, **kwargs)
        except BaseException as err:
            _close_runs("KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")
            if isinstance(err, (ConfigError, DataError, FileNotFoundError, FloatingPointError, MemoryError)):
                raise click.ClickException(str(err)) from None
            if isinstance(err, MlflowException):
                raise click.ClickException(f"MLflow tracking failed ({err.message}); "
                                           "check tracking.uri / MLFLOW_TRACKING_URI") from None
            raise
        _pause_parents()
        return result
    return wrapper


def _pause_parents() -> None:
    tracking = sys.modules.get("pipeline.tracking")
    if tracking is not None:
        tracking.pause_parents()


def _close_runs(status: str) -> None:
    tracking = sys.modules.get("pipeline.tracking")  # not imported: no run was opened
    if tracking is not None:
        tracking.fail_open_runs(status)


# The two models every stage after training compares, in the order a pair option takes them.
MODELS = ("baseline", "iet")


def params_option(fn):
    return click.option("--params", "params_path", default="params.yaml", show_default=True,
                        type=click.Path(dir_okay=False), help="parameter file")(fn)


def path_option(*decls: str, help: str):
    """A file or folder the stage reads or writes. Required and without a default: dvc.yaml's `cmd`
    names every path a stage touches, so its files are declared there once."""
    return click.option(*decls, required=True, type=click.Path(path_type=Path), help=help)


def pair_option(*decls: str, help: str):
    """A path_option of both MODELS (the baseline's, then the IET model's), given to the stage as a
    dict model -> path."""
    return click.option(*decls, required=True, nargs=2, type=click.Path(path_type=Path),
                        callback=lambda ctx, param, value: dict(zip(MODELS, value)),
                        help=f"{help}: the baseline's, then the IET model's")
