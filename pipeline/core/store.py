"""Where the MLflow store is, and whether it can be used at all, decided in seconds and without
importing MLflow: an HTTP server that does not answer, or a SQLite file that should exist and
does not."""
from __future__ import annotations

import importlib.util
import os
import re
import socket
import sqlite3
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from pipeline.core.config import ConfigError, TrackingConfig
from pipeline.core.io import local_path


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
    A SQLite file that is there must be a usable MLflow store (_check_sqlite); a database server
    needs its driver. Other schemes (databricks, ...) are left to MLflow."""
    parsed = urllib.parse.urlparse(uri)
    if parsed.scheme in ("http", "https"):
        _check_server(uri, timeout)
    elif parsed.scheme == "sqlite":
        path = sqlite_file(uri)
        if path is None:  # MLflow would accept it, record nothing and put the artifacts in ./mlruns
            raise StoreError(f"tracking URI {uri} is an in-memory SQLite store, which keeps nothing; "
                             "use sqlite:///<path>/mlflow.db")
        if must_exist and not path.exists():
            raise StoreError(f"no MLflow store at {path} (tracking URI {uri}); run the pipeline first "
                             "or give the right tracking URI")
        _check_folder(path.parent, uri)
        if path.exists():
            _check_sqlite(path, uri, writing=not must_exist)
    elif "+" in parsed.scheme or parsed.scheme in SQLALCHEMY_SCHEMES:
        _check_driver(uri)
    elif parsed.scheme in ("file", "") or len(parsed.scheme) == 1:  # a path; one letter: a Windows drive
        if os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() not in ("true", "1"):
            raise StoreError(f"tracking URI {uri} is a file store, which MLflow 3 refuses unless "
                             "MLFLOW_ALLOW_FILE_STORE=true; use sqlite:///<path>/mlflow.db instead")
        folder = local_path(uri)
        if must_exist and not folder.is_dir():
            raise StoreError(f"no MLflow store at {folder} (tracking URI {uri})")
        _check_folder(folder if folder.exists() else folder.parent, uri)


# database servers MLflow reaches through SQLAlchemy (dialect+driver://... too)
SQLALCHEMY_SCHEMES = ("postgresql", "postgres", "mysql", "mariadb", "mssql", "oracle")
# what MLflow's SQLAlchemy store creates in an empty database; a database with other tables is not one
MLFLOW_TABLES = {"alembic_version", "experiments", "runs"}


def _check_sqlite(path: Path, uri: str, writing: bool) -> None:
    """An existing store file must be what MLflow can open: a file (a folder made MLflow retry for
    minutes), readable and, for the stages, writable (found only at the first write, after DVC
    deleted the outputs), a SQLite database that is not damaged (a truncated one failed mid-stage)
    and either empty or holding MLflow's tables (MLflow would add its own to a foreign database)."""
    if path.is_dir():
        raise StoreError(f"{path}: is a folder, not an MLflow SQLite file (tracking URI {uri})")
    if not os.access(path, os.R_OK | (os.W_OK if writing else 0)):
        raise StoreError(f"{path}: the MLflow store is not {'writable' if writing else 'readable'} "
                         f"(tracking URI {uri})")
    if path.stat().st_size == 0:
        return  # a new store: MLflow creates its tables
    try:
        with open(path, "rb") as f:
            header = f.read(16)
        if header != b"SQLite format 3\x00":
            raise sqlite3.DatabaseError("file is not a database")
        db = sqlite3.connect(path.resolve().as_uri() + "?mode=ro", uri=True)
        try:
            tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            check = db.execute("PRAGMA quick_check").fetchone()[0]
            versions = [row[0] for row in db.execute("SELECT version_num FROM alembic_version")] \
                if "alembic_version" in tables else []
        finally:
            db.close()
    except sqlite3.Error as err:
        raise StoreError(f"{path}: not a readable SQLite database ({err}); restore it or give another "
                         f"tracking URI") from None
    if check != "ok":
        raise StoreError(f"{path}: damaged SQLite database ({check}); restore it or give another tracking URI")
    if tables and not MLFLOW_TABLES <= tables:
        raise StoreError(f"{path}: a SQLite database without MLflow's tables ({', '.join(sorted(MLFLOW_TABLES - tables))} "
                         "missing), not an MLflow store; give another tracking URI")
    _check_schema(path, uri, versions)


def _check_schema(path: Path, uri: str, versions: list[str]) -> None:
    """MLflow opens only a store at its own schema revision, and says so at the first stage that
    logs, after DVC deleted that stage's outputs: an older store needs `mlflow db upgrade`, a newer
    one (another MLflow wrote it) that MLflow."""
    heads, known = mlflow_schema_revisions()
    if len(heads) != 1 or versions == list(heads):
        return  # no single head to compare with: left to MLflow
    head = next(iter(heads))
    if versions and versions[0] in known:
        raise StoreError(f"{path}: an MLflow store of an older schema ({versions[0]}; this MLflow's is {head}): "
                         f"back it up, then run `mlflow db upgrade {uri}`")
    from importlib.metadata import version

    raise StoreError(f"{path}: an MLflow store of schema {versions[0] if versions else 'none'}, which MLflow "
                     f"{version('mlflow')} does not know (a newer MLflow wrote it?); use that MLflow or give "
                     "another tracking URI")


def mlflow_schema_revisions() -> tuple[set[str], set[str]]:
    """The installed MLflow's schema head(s) and all its revisions, read from the `revision` and
    `down_revision` lines of its alembic migration scripts: alembic's own answer without importing
    MLflow, which costs seconds (tests/test_bad_store.py checks the two agree)."""
    spec = importlib.util.find_spec("mlflow")
    folder = Path(spec.origin).parent / "store" / "db_migrations" / "versions"
    revisions, parents = set(), set()
    for script in folder.glob("*.py"):
        text = script.read_text()
        if (revision := re.search(r"^revision\s*=\s*[\"'](\w+)[\"']", text, re.M)) is None:
            continue
        revisions.add(revision.group(1))
        if (down := re.search(r"^down_revision\s*=\s*(.+)$", text, re.M)) is not None:
            parents |= set(re.findall(r"[\"'](\w+)[\"']", down.group(1)))
    return revisions - parents, revisions


def _check_driver(uri: str) -> None:
    """A database server's URI needs its Python driver, found otherwise only at the first stage
    that logs (a ModuleNotFoundError after DVC deleted its outputs)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    try:
        url = make_url(uri)
        shown = url.render_as_string(hide_password=True)
        url.get_dialect().import_dbapi()
    except (ArgumentError, NoSuchModuleError) as err:
        raise StoreError(f"tracking URI {uri.split('://')[0]}://...: not a database URI SQLAlchemy knows "
                         f"({err})") from None
    except ImportError as err:
        raise StoreError(f"tracking URI {shown}: its database driver is not installed ({err.name or err}); "
                         "install it or use sqlite:///<path>/mlflow.db") from None


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
