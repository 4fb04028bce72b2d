"""One thin click command per DVC stage; each runs on its own as `python -m stages.<name>`."""
from __future__ import annotations

import functools

import click

from pipeline.config import ConfigError


def stage(fn):
    """Turn the errors a user can fix (bad params, bad data, missing inputs, unreachable tracking
    server, a diverged or out-of-memory training step) into one clear message and exit code 1,
    without a traceback."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from mlflow.exceptions import MlflowException

        from pipeline.data import DataError
        try:
            return fn(*args, **kwargs)
        except (ConfigError, DataError, FileNotFoundError, FloatingPointError, MemoryError) as err:
            raise click.ClickException(str(err)) from None
        except MlflowException as err:
            raise click.ClickException(f"MLflow tracking failed ({err.message}); "
                                       "check tracking.uri / MLFLOW_TRACKING_URI") from None
    return wrapper


def params_option(fn):
    return click.option("--params", "params_path", default="params.yaml", show_default=True,
                        type=click.Path(dir_okay=False), help="parameter file")(fn)
