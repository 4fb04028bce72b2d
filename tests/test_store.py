"""The tracking-store check that runs before any work (validate, and every tracked stage): every
local store kind MLflow would fail on later is refused now, in one line naming the URI."""
import os

import pytest

from pipeline.core.store import StoreError, check_store


@pytest.mark.parametrize("uri", ["file:///{missing}/mlruns", "{missing}/mlruns"])
def test_a_file_store_is_refused_unless_mlflow_allows_it(tmp_path, monkeypatch, uri):
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    with pytest.raises(StoreError, match="file store, which MLflow 3 refuses"):
        check_store(uri.format(missing=tmp_path / "missing"), must_exist=False)


def test_an_allowed_file_store_needs_a_folder_that_can_hold_it(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    with pytest.raises(StoreError, match="does not exist"):
        check_store(f"file://{tmp_path}/missing/dir/mlruns", must_exist=False)
    check_store(f"file://{tmp_path}/mlruns", must_exist=False)  # its parent exists: MLflow creates it


def test_a_sqlite_store_in_a_missing_or_read_only_folder_is_refused(tmp_path):
    with pytest.raises(StoreError, match="does not exist"):
        check_store(f"sqlite:///{tmp_path}/missing/mlflow.db", must_exist=False)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        if os.access(locked, os.W_OK):  # root ignores permissions: nothing to check there
            pytest.skip("running as a user who may write anywhere")
        with pytest.raises(StoreError, match="not writable"):
            check_store(f"sqlite:///{locked}/mlflow.db", must_exist=False)
    finally:
        locked.chmod(0o755)
    check_store(f"sqlite:///{tmp_path}/mlflow.db", must_exist=False)  # a new store in a real folder is fine


def test_validate_refuses_a_bad_tracking_uri_before_any_stage_runs(tmp_path, monkeypatch):
    """The validate stage runs before DVC deletes any output: a store that would fail at the report
    stage, after training and evaluation, fails here."""
    import yaml
    from click.testing import CliRunner

    from stages import validate

    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    params = yaml.safe_load(open(os.path.join(os.path.dirname(__file__), "..", "params.yaml")))
    params["tracking"]["uri"] = f"file://{tmp_path}/missing/mlruns"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    result = CliRunner().invoke(validate.main, ["--pipeline", os.path.join(os.path.dirname(__file__), "..", "dvc.yaml"),
                                                "--params", str(tmp_path / "params.yaml"),
                                                "--out", str(tmp_path / "params_ok")])
    assert result.exit_code == 1 and "file store" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "params_ok").exists()
