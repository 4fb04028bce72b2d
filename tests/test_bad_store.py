"""The MLflow store opened as the stages will open it, before any of them runs: a damaged, foreign,
in-memory or unwritable store, a folder, a server without its driver, each refused in one line by
validate (before DVC deletes a trained model) and by the commands that read the store."""
import re
import shutil
import sqlite3
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from commands.cli import main as cli
from pipeline.core.config import ConfigError, TrackingConfig
from pipeline.core.store import StoreError, check_store, check_tracking
from stages import validate

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def real_store(tmp_path_factory) -> Path:
    """A real MLflow SQLite store with some runs in it."""
    from mlflow import MlflowClient

    path = tmp_path_factory.mktemp("store") / "mlflow.db"
    client = MlflowClient(f"sqlite:///{path}")
    exp = client.create_experiment("x")
    for i in range(20):
        client.log_param(client.create_run(exp).info.run_id, "p", "v" * 200)
    return path


def _bad(tmp_path, real_store, kind) -> Path:
    path = tmp_path / "mlflow.db"
    if kind == "truncated":
        path.write_bytes(real_store.read_bytes()[:len(real_store.read_bytes()) // 2])
    elif kind == "not sqlite":
        path.write_text("name,value\n")
    elif kind == "folder":
        path.mkdir()
    elif kind == "foreign":
        db = sqlite3.connect(path)
        db.execute("CREATE TABLE notes (text)")
        db.commit()
        db.close()
    elif kind in ("older schema", "newer schema"):  # a store of another MLflow version
        shutil.copy(real_store, path)
        db = sqlite3.connect(path)
        scripts = _alembic()
        older = scripts.get_revision(scripts.get_current_head()).down_revision
        db.execute("UPDATE alembic_version SET version_num = ?", (older if kind == "older schema" else "ffffffffffff",))
        db.commit()
        db.close()
    return path


def _alembic():
    """Alembic's reading of the installed MLflow's migration scripts."""
    import importlib.util

    from alembic.script import ScriptDirectory

    return ScriptDirectory(str(Path(importlib.util.find_spec("mlflow").origin).parent / "store/db_migrations"))


def test_the_schema_revisions_read_from_mlflows_scripts_are_alembics():
    from pipeline.core.store import mlflow_schema_revisions

    heads, known = mlflow_schema_revisions()
    scripts = _alembic()
    assert heads == set(scripts.get_heads()) and known == {r.revision for r in scripts.walk_revisions()}


CASES = {"truncated": "not a readable SQLite database (database disk image is malformed)",
         "not sqlite": "not a readable SQLite database (file is not a database)",
         "folder": "is a folder, not an MLflow SQLite file",
         "foreign": "a SQLite database without MLflow's tables",
         "older schema": "an MLflow store of an older schema",
         "newer schema": "an MLflow store of schema ffffffffffff, which MLflow"}


@pytest.mark.parametrize("kind", CASES)
def test_a_store_mlflow_cannot_use_is_refused_in_one_line(tmp_path, real_store, kind):
    path = _bad(tmp_path, real_store, kind)
    for must_exist in (True, False):
        with pytest.raises(StoreError, match="^" + re.escape(f"{path}: {CASES[kind]}")):
            check_store(f"sqlite:///{path}", must_exist=must_exist)


def test_a_real_store_a_new_one_and_an_empty_file_pass(tmp_path, real_store):
    check_store(f"sqlite:///{real_store}", must_exist=True)
    check_store(f"sqlite:///{tmp_path / 'new.db'}", must_exist=False)
    (tmp_path / "empty.db").touch()
    check_store(f"sqlite:///{tmp_path / 'empty.db'}", must_exist=False)


@pytest.mark.parametrize("uri", ["sqlite:///:memory:", "sqlite://"])
def test_an_in_memory_store_is_refused(uri):
    with pytest.raises(ConfigError, match="in-memory SQLite store, which keeps nothing"):
        check_tracking(TrackingConfig(uri=uri))


@pytest.mark.parametrize("uri, driver", [("postgresql://me:secret@localhost/mlflow", "psycopg"),
                                         ("mysql+pymysql://localhost/mlflow", "pymysql")])
def test_a_database_server_without_its_driver_is_refused_hiding_the_password(uri, driver):
    import importlib.util

    if importlib.util.find_spec(driver):
        pytest.skip(f"{driver} is installed here")
    with pytest.raises(ConfigError, match=f"its database driver is not installed \\({driver}\\)") as err:
        check_tracking(TrackingConfig(uri=uri))
    assert "secret" not in str(err.value)


def test_a_store_file_that_cannot_be_written_is_refused_for_the_stages(tmp_path, real_store):
    path = tmp_path / "mlflow.db"
    shutil.copy(real_store, path)
    if shutil.which("chattr") and subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode == 0:
        undo = ["chattr", "-i", str(path)]  # immutable: even root cannot write it
    else:
        path.chmod(0o444)
        undo = ["chmod", "644", str(path)]
    try:
        import os
        if os.access(path, os.W_OK):
            pytest.skip("cannot make a file unwritable here")
        with pytest.raises(StoreError, match="the MLflow store is not writable"):
            check_store(f"sqlite:///{path}", must_exist=False)
        check_store(f"sqlite:///{path}", must_exist=True)  # reading it is fine
    finally:
        subprocess.run(undo, check=True)


def test_validate_refuses_a_damaged_store_and_writes_nothing(tmp_path, real_store):
    path = _bad(tmp_path, real_store, "truncated")
    text = (ROOT / "params.yaml").read_text().replace("  uri: null", f"  uri: sqlite:///{path}", 1)
    assert f"sqlite:///{path}" in text
    (tmp_path / "params.yaml").write_text(text)
    result = CliRunner().invoke(validate.main, ["--pipeline", str(ROOT / "dvc.yaml"), "--params", str(tmp_path / "params.yaml"),
                                                "--out", str(tmp_path / "ok")])
    assert result.exit_code == 1 and "disk image is malformed" in result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "ok").exists()


@pytest.mark.parametrize("command", [["tradeoff", "--out", "{tmp}/t.png"], ["ablation"],
                                     ["sample", "--model", "models:/x@candidate", "--grid", "{tmp}/g.png"]])
@pytest.mark.parametrize("kind", ["truncated", "not sqlite"])
def test_reading_commands_name_a_damaged_store_in_one_line(tmp_path, real_store, command, kind):
    path = _bad(tmp_path, real_store, kind)
    args = [a.format(tmp=tmp_path) for a in command] + ["--tracking-uri", f"sqlite:///{path}"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1, result.output
    assert result.output.startswith(f"Error: {path}: {CASES[kind]}") and len(result.output.strip().splitlines()) == 1


@pytest.mark.parametrize("kind", ["older schema", "newer schema"])
def test_mlflow_itself_refuses_a_store_of_another_schema(tmp_path, real_store, kind):
    """What validate's refusal spares: MLflow opens such a store only to refuse it, in a stage."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException, match="out-of-date database schema"):
        MlflowClient(f"sqlite:///{_bad(tmp_path, real_store, kind)}").search_experiments()
