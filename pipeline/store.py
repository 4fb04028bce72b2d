"""Where the MLflow store is, and whether it can be used at all, decided in seconds and without
importing MLflow: an HTTP server that does not answer, or a SQLite file that should exist and
does not."""
from __future__ import annotations

import os
import socket
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from pipeline.config import ConfigError, TrackingConfig
from pipeline.io import local_path


class StoreError(Exception):
    """The tracking store cannot be used; the message names its URI."""


def fail_fast_http() -> None:
    """MLflow retries a failing HTTP request 7 times with exponential backoff (minutes in all);
    a command line tool should say the server is gone within seconds. Explicit settings win."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")


def check_store(uri: str, must_exist: bool = True, timeout: float = 5.0) -> None:
    """Stop early, naming the URI, when the tracking store cannot be used: an HTTP server that does
    not answer; a SQLite file that does not exist when reading (MLflow would create it empty and
    then report the model as missing) or whose folder cannot hold it when writing; a file store,
    which MLflow 3 refuses unless MLFLOW_ALLOW_FILE_STORE is set, in a folder that cannot be made.
    Other schemes (postgresql://, databricks, ...) are left to MLflow."""
    parsed = urllib.parse.urlparse(uri)
    if parsed.scheme in ("http", "https"):
        _check_server(uri, timeout)
    elif parsed.scheme == "sqlite":
        path = sqlite_file(uri)
        if path is None:
            return
        if must_exist and not path.is_file():
            raise StoreError(f"no MLflow store at {path} (tracking URI {uri}); run the pipeline first "
                             "or give the right tracking URI")
        _check_folder(path.parent, uri)
    elif parsed.scheme in ("file", "") or len(parsed.scheme) == 1:  # a path; one letter: a Windows drive
        if os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() not in ("true", "1"):
            raise StoreError(f"tracking URI {uri} is a file store, which MLflow 3 refuses unless "
                             "MLFLOW_ALLOW_FILE_STORE=true; use sqlite:///<path>/mlflow.db instead")
        folder = local_path(uri)
        if must_exist and not folder.is_dir():
            raise StoreError(f"no MLflow store at {folder} (tracking URI {uri})")
        _check_folder(folder if folder.exists() else folder.parent, uri)


def _check_server(uri: str, timeout: float) -> None:
    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout).close()
    except urllib.error.HTTPError:
        pass  # the server answered; whatever it said, it is there
    except (urllib.error.URLError, OSError, socket.timeout) as err:
        reason = getattr(err, "reason", err)
        raise StoreError(f"MLflow tracking server {uri} cannot be reached ({reason}); start it or "
                         "set tracking.uri / MLFLOW_TRACKING_URI / --tracking-uri") from None


def _check_folder(folder: Path, uri: str) -> None:
    """The folder a local store lives in must exist and be writable: MLflow would fail at the first
    write, which for the report stage is after training and evaluation."""
    if not folder.is_dir():
        raise StoreError(f"folder {folder} of tracking URI {uri} does not exist; create it or fix tracking.uri")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise StoreError(f"folder {folder} of tracking URI {uri} is not writable")


def repo_root() -> Path:
    """The workspace, also from inside a queued DVC experiment (run in a copy under .dvc/tmp/exps),
    so every experiment logs into the workspace's store."""
    cwd = Path.cwd().resolve()
    parts = cwd.parts
    for i in range(len(parts) - 2):
        if parts[i:i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    return cwd


def tracking_uri(cfg: TrackingConfig) -> str:
    return cfg.uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{repo_root() / 'mlflow.db'}"


def sqlite_file(uri: str) -> Path | None:
    """The file of a SQLite store (sqlite:///<path>); None for an in-memory one or another store."""
    path = uri[len("sqlite:///"):] if uri.startswith("sqlite:///") else ""
    return Path(path) if path and path != ":memory:" else None


def artifact_root(uri: str) -> str | None:
    """Where a new experiment of a SQLite store keeps its artifacts: beside the store file. MLflow's
    own default is ./mlruns under the working directory, which for a queued DVC experiment is a
    temporary copy that DVC deletes, and the runs' curves and figures with it. None (the server's or
    MLflow's default) for any other store."""
    path = sqlite_file(uri)
    return None if path is None else (path.resolve().parent / "mlartifacts").as_uri()


def check_tracking(cfg: TrackingConfig) -> str:
    """The tracking URI, after making sure it answers within seconds: MLflow itself retries a dead
    server for minutes. A SQLite store that does not exist yet is fine, the pipeline creates it."""
    uri = tracking_uri(cfg)
    fail_fast_http()
    try:
        check_store(uri, must_exist=False)
    except StoreError as err:
        raise ConfigError(str(err)) from None
    return uri
