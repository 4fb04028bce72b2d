"""One thin click command per DVC stage; each runs on its own as `python -m stages.<name>`."""
from __future__ import annotations

from pipeline.core.preload import hand_over

hand_over()  # first: a warm process that has imported torch, diffusers and MLflow runs the stage

import functools
import signal
import sys
import threading
from pathlib import Path

import click

from pipeline.core.config import ConfigError, load_params

# Stages that log to MLflow: they check the tracking server before any work, so that a dead one
# costs seconds, not a trained model (MLflow would retry it for minutes, at the end).
# By file name: under `python -m stages.iet` the module is called __main__.
TRACKED = {"pretrain", "train", "finish", "evaluate", "report", "register"}


class Terminated(KeyboardInterrupt):
    """SIGTERM (what `timeout`, systemd, Slurm and Kubernetes send), handled as Ctrl-C is: the
    stage's MLflow runs are marked KILLED instead of being left RUNNING."""


def _on_sigterm(signum, frame):
    raise Terminated()


def _handle_sigterm():
    """Install the SIGTERM handler (the main thread only can); the handler it replaced, to restore."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, _on_sigterm)


def stage(fn):
    """Turn the errors a user can fix (bad params, bad data, missing inputs, unreachable tracking
    server, a diverged or out-of-memory training step) into one clear message and exit code 1,
    without a traceback; on any failure, mark the MLflow runs the stage opened as failed."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from pipeline.core.io import DataError, DiskFull, no_space
        previous = _handle_sigterm()
        try:
            if Path(fn.__code__.co_filename).stem in TRACKED and "params_path" in kwargs:
                from pipeline.core.store import check_tracking

                check_tracking(load_params(kwargs["params_path"]).tracking)
            result = fn(*args, **kwargs)
        except BaseException as err:
            _close_runs("KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")
            if no_space(err):  # anywhere in the stage: one line, not a library's traceback
                raise click.ClickException(str(err) if isinstance(err, DiskFull) else (
                    f"{err.filename}: no space left on device" if getattr(err, "filename", None)
                    else f"no space left on device ({type(err).__name__} while writing)")) from None
            if isinstance(err, Terminated):
                click.echo("stopped by SIGTERM; its MLflow runs are marked KILLED", err=True)
                sys.exit(128 + signal.SIGTERM)  # the status a process killed by it would have
            if isinstance(err, (ConfigError, DataError, FileNotFoundError, FloatingPointError, MemoryError)):
                # never an empty line: a bare MemoryError has no message
                raise click.ClickException(str(err) or (
                    "out of memory (MemoryError)" if isinstance(err, MemoryError) else type(err).__name__)) from None
            if isinstance(err, _mlflow_error()):
                raise click.ClickException(f"MLflow tracking failed ({err.message}); "
                                           "check tracking.uri / MLFLOW_TRACKING_URI") from None
            raise
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
        _pause_parents()
        return result
    return wrapper


def _mlflow_error() -> tuple[type, ...]:
    """MLflow's exception class if this stage loaded MLflow (else none of its errors can occur):
    importing MLflow costs seconds, which a stage that does not log should not pay."""
    exceptions = sys.modules.get("mlflow.exceptions")
    return (exceptions.MlflowException,) if exceptions else ()


def _pause_parents() -> None:
    tracking = sys.modules.get("pipeline.track.tracking")
    if tracking is not None:
        tracking.pause_parents()


def _close_runs(status: str) -> None:
    tracking = sys.modules.get("pipeline.track.tracking")  # not imported: no run was opened
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


def round_stage_options(fn):
    """What every stage of a model's rounds (train, profile, finish) takes: the model, and the files
    it is rebuilt from (pipeline.train.launch.run_round_stage). Train and profile also take `--round`."""
    options = [
        click.argument("model", type=click.Choice(MODELS)),
        params_option,
        path_option("--train", "train_path", help="prepared training set (.npz)"),
        click.option("--shards", "shards_path", type=click.Path(path_type=Path), default=None,
                     help="the IET model's initial shard of every training sample (split stage)"),
        path_option("--pretrained", help="the pretrain stage's folder, which model.init_from may name (fine-tuning)"),
        path_option("--rounds", "rounds_dir", help="the model's rounds folder (pipeline/core/layout.py)"),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def round_option(fn):
    return click.option("--round", "rnd", required=True, type=click.IntRange(min=1),
                        help="the round, from 1 (the DVC stage's @ key)")(fn)
