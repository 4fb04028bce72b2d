"""Loaded by every Python process started with this folder on PYTHONPATH (Python's `site` imports
`sitecustomize`): with IET_AGC_PARAMS_READ set to a folder, a stage's process records which
parameters it reads and writes them there as JSON when it exits, with its command line. A read is
an attribute access to a field (not itself a group) of the params a stage loaded from its file
(pipeline.core.config.load_params), outside the tracking module (what goes to MLflow is no DVC output);
params built otherwise (defaults to compare with) are not the stage's input.
tests/test_e2e.py runs the pipeline under it."""
import atexit
import json
import os
import sys
import uuid

_OUT = os.environ.get("IET_AGC_PARAMS_READ")


def _install(out: str) -> None:
    sys.path.insert(0, os.getcwd())  # the stages run from the repository root
    from pydantic import BaseModel

    from pipeline.core import config

    loaded: dict[int, tuple[object, str]] = {}  # id -> (the group, kept alive so ids stay unique; its key prefix)
    read: set[str] = set()
    tracking = os.path.join("pipeline", "track", "tracking.py")

    def recording(self, name):
        value = object.__getattribute__(self, name)
        if id(self) in loaded and not isinstance(value, BaseModel) and name in type(self).model_fields \
                and not sys._getframe(1).f_code.co_filename.endswith(tracking):
            read.add(loaded[id(self)][1] + name)
        return value

    def load_params(*args, **kwargs):
        params = original(*args, **kwargs)
        _register(params, "", loaded)
        return params

    original = config.load_params
    config._Group.__getattribute__ = recording
    config.load_params = load_params

    def dump() -> None:
        if _stage_command() is None:  # the warm process (pipeline/core/preload.py) itself: no stage
            return
        with open(os.path.join(out, f"{uuid.uuid4().hex}.json"), "w") as f:
            json.dump({"command": _stage_command(), "read": sorted(read)}, f)

    atexit.register(dump)


def _register(group, prefix: str, loaded: dict) -> None:
    from pydantic import BaseModel

    loaded[id(group)] = (group, prefix)
    for name in type(group).model_fields:
        value = object.__getattribute__(group, name)
        if isinstance(value, BaseModel):
            _register(value, f"{prefix}{name}.", loaded)


def _stage_command() -> list[str] | None:
    """`stages.<name>` and its arguments when this process runs a stage (`python -m stages.<name>`)."""
    argv = sys.orig_argv
    if "-m" in argv and argv.index("-m") + 1 < len(argv) and argv[argv.index("-m") + 1].startswith("stages."):
        return argv[argv.index("-m") + 1:]
    return None


def _warm_process() -> bool:
    """The process that forks the stages' processes (pipeline/core/preload.py): each child runs one stage
    and takes that stage's command line before it runs it, so the probe installed here records it."""
    return sys.orig_argv[1:3] == ["-m", "pipeline.core.preload"]


if _OUT and (_stage_command() or _warm_process()):  # not DVC, git or a test's own process
    _install(_OUT)
