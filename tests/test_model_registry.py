"""Registering the final models in a real MLflow store (SQLite in tmp_path) and loading them back."""
import json
import os
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from click.testing import CliRunner

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import mlflow  # noqa: E402
from mlflow import MlflowClient  # noqa: E402
from mlflow.entities import LoggedModelStatus  # noqa: E402

from pipeline.compare import model_registry  # noqa: E402
from pipeline.core.models import build_scheduler, build_unet, save_pipeline  # noqa: E402
from pipeline.core.store import StoreError  # noqa: E402
from stages import register as register_stage  # noqa: E402
from tiny import arch, dvc_args  # noqa: E402

PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"
TINY = arch()


def tiny_model(path, seed=0):
    save_pipeline(build_unet(TINY, 8, 1, seed), build_scheduler(TINY), path)
    return path


def same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One SQLite store for the module (a new store costs seconds of schema migration), with a
    finished run to log to."""
    root = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("t", artifact_location=(root / "artifacts").as_uri())
    run = client.create_run(exp, tags={"git_commit": "abc"})
    client.set_terminated(run.info.run_id)
    return client, run.info.run_id, root


@pytest.fixture(scope="module")
def registered(store):
    client, run_id, root = store
    model_dir = tiny_model(root / "model")
    model_registry.claim_names(client, ["tiny"])
    info = model_registry.register(client, run_id, model_dir, "tiny", "candidate", label="iet", tags={"mem_ratio": 0.25})
    return client, run_id, model_dir, info


def test_registered_model_loads_back_with_one_call_and_the_same_weights(registered):
    client, run_id, model_dir, info = registered
    assert info["version"] == 1 and info["alias_uri"] == "models:/tiny@candidate"
    expected = model_registry.load_diffusers(model_dir)  # a local directory works too
    for uri in ("models:/tiny@candidate", "models:/tiny/1", "models:/tiny/latest", f"models:/{info['model_id']}"):
        pipe = model_registry.load_diffusers(uri, tracking_uri=client.tracking_uri)
        assert type(pipe).__name__ == "DDPMPipeline"
        assert same_weights(pipe.unet, expected.unet), uri
        assert pipe.scheduler.config.num_train_timesteps == 10


def test_registry_records_where_the_model_came_from(registered):
    client, run_id, _, info = registered
    model = client.get_registered_model("tiny")
    assert model.tags[model_registry.PROJECT_TAG] == model_registry.PROJECT
    assert {a: str(v) for a, v in model.aliases.items()} == {"candidate": "1"}
    version = client.get_model_version("tiny", "1")
    assert version.run_id == run_id and version.tags["mem_ratio"] == "0.25"
    logged = client.get_logged_model(info["model_id"])
    assert logged.source_run_id == run_id and logged.status == LoggedModelStatus.READY
    # the artifact layout other code relies on: a pipeline directory with model_index.json
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=logged.artifact_location,
                                                     tracking_uri=client.tracking_uri))
    assert (local / "artifacts" / model_registry.PIPELINE_ARTIFACT / "model_index.json").is_file()
    assert "torch==" in (local / "requirements.txt").read_text()


def test_pyfunc_flavour_samples_one_image_per_seed(registered, monkeypatch):
    client, _, _, info = registered
    monkeypatch.setenv("MLFLOW_TRACKING_URI", client.tracking_uri)
    monkeypatch.setattr(sys, "path", list(sys.path))  # loading prepends the model's code/ folder
    model = mlflow.pyfunc.load_model("models:/tiny@candidate")
    images = model.predict(pd.DataFrame({"seed": [3, 4, 3]}), params={"steps": 2})
    assert images.shape == (3, 8, 8, 1) and images.dtype == "uint8"
    assert (images[0] == images[2]).all() and not (images[0] == images[1]).all()


def test_a_second_registration_moves_the_alias(registered, tmp_path):
    client, run_id, _, _ = registered
    model_registry.claim_names(client, ["moving"])
    first = model_registry.register(client, run_id, tiny_model(tmp_path / "a", seed=0), "moving", "candidate", label="a")
    second = model_registry.register(client, run_id, tiny_model(tmp_path / "b", seed=1), "moving", "candidate", label="b")
    assert (first["version"], second["version"]) == (1, 2)
    assert str(client.get_model_version_by_alias("moving", "candidate").version) == "2"
    old = model_registry.load_diffusers("models:/moving/1", tracking_uri=client.tracking_uri)
    new = model_registry.load_diffusers("models:/moving@candidate", tracking_uri=client.tracking_uri)
    assert same_weights(old.unet, model_registry.load_diffusers(tmp_path / "a").unet)
    assert not same_weights(old.unet, new.unet)


def test_foreign_registered_model_is_refused_by_name(store):
    client, _, _ = store
    client.create_registered_model("someone-elses")
    with pytest.raises(model_registry.NameTaken, match="'someone-elses'.*not created by this project"):
        model_registry.claim_names(client, ["fresh-name", "someone-elses"])
    # refused before anything was created
    assert not client.search_registered_models("name = 'fresh-name'")


@pytest.mark.parametrize("uri, words", [
    ("models:/tiny/99", ["'tiny'", "no version 99", "versions: 1"]),
    ("models:/tiny@nope", ["no alias 'nope'", "candidate -> 1"]),
    ("models:/nothing@candidate", ["no registered model 'nothing'", "tiny"]),
    ("models:/tiny", ["give a version or an alias"]),
])
def test_missing_version_alias_or_model_is_named(registered, uri, words):
    client = registered[0]
    with pytest.raises(model_registry.FetchError) as err:
        model_registry.load_diffusers(uri, tracking_uri=client.tracking_uri)
    assert all(w in str(err.value) for w in words), str(err.value)


def test_unreachable_server_fails_fast_and_names_it():
    start = time.monotonic()
    with pytest.raises(StoreError, match=r"http://127\.0\.0\.1:9 cannot be reached"):
        model_registry.load_diffusers("models:/tiny@candidate", tracking_uri="http://127.0.0.1:9")
    assert time.monotonic() - start < 10


def test_missing_sqlite_store_is_not_created(tmp_path):
    db = tmp_path / "none.db"
    with pytest.raises(StoreError, match="no MLflow store"):
        model_registry.load_diffusers("models:/tiny@candidate", tracking_uri=f"sqlite:///{db}")
    assert not db.exists()


# ---- the `register` stage, in a project layout as DVC leaves it after `evaluate` ----

def _project(root: Path, uri: str, **tracking) -> Path:
    raw = yaml.safe_load(PARAMS.read_text())
    raw["tracking"].update({"uri": uri, "experiment": "stage", **tracking})
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    for seed, m in enumerate(("iet", "baseline")):
        tiny_model(root / f"runs/{m}/model", seed=seed)
        (root / f"runs/eval/{m}").mkdir(parents=True)
        (root / f"runs/eval/{m}/metrics.json").write_text(json.dumps({"mem_ratio": 0.1 * seed, "fd": 2.0}))
    return root


def test_register_stage_registers_both_models_under_the_parent_run(store, tmp_path, monkeypatch):
    client = store[0]
    monkeypatch.chdir(_project(tmp_path, client.tracking_uri, registry_name="proj"))
    result = CliRunner().invoke(register_stage.main, dvc_args("register"))
    assert result.exit_code == 0, result.output
    assert "models:/proj@candidate -> version 1" in result.output
    out = json.loads(Path("runs/register/registered.json").read_text())
    assert out["iet"]["name"] == "proj" and out["baseline"]["name"] == "proj-baseline"
    assert out["iet"]["run_id"] == out["baseline"]["run_id"]
    parent = client.get_run(out["iet"]["run_id"])
    assert parent.data.tags["mlflow.runName"].startswith("repro-")  # the pipeline's parent run
    assert {o.model_id for o in parent.outputs.model_outputs} == {out["iet"]["model_id"], out["baseline"]["model_id"]}
    assert client.get_model_version("proj-baseline", "1").tags["mem_ratio"] == "0.1"  # baseline: seed 1
    for m, name in (("iet", "proj"), ("baseline", "proj-baseline")):
        pipe = model_registry.load_diffusers(f"models:/{name}@candidate", tracking_uri=client.tracking_uri)
        assert same_weights(pipe.unet, model_registry.load_diffusers(f"runs/{m}/model").unet)


def test_register_stage_refuses_a_foreign_name_and_keeps_the_models(store, tmp_path, monkeypatch):
    client = store[0]
    client.create_registered_model("theirs")
    monkeypatch.chdir(_project(tmp_path, client.tracking_uri, registry_name="theirs"))
    result = CliRunner().invoke(register_stage.main, dvc_args("register"))
    assert result.exit_code == 1
    assert "'theirs'" in result.output and "not created by this project" in result.output
    assert not client.search_model_versions("name = 'theirs'")
    assert not Path("runs/register/registered.json").exists()
    assert Path("runs/iet/model/unet/diffusion_pytorch_model.safetensors").is_file()


def test_register_stage_with_unreachable_server_stops_quickly(tmp_path, monkeypatch):
    monkeypatch.chdir(_project(tmp_path, "http://127.0.0.1:9"))
    start = time.monotonic()
    result = CliRunner().invoke(register_stage.main, dvc_args("register"))
    assert result.exit_code == 1 and "http://127.0.0.1:9 cannot be reached" in result.output
    assert time.monotonic() - start < 10
    assert Path("runs/iet/model/model_index.json").is_file()


def test_register_stage_rejects_a_bad_alias_before_touching_mlflow(tmp_path, monkeypatch):
    monkeypatch.chdir(_project(tmp_path, "http://127.0.0.1:9", alias="v3"))
    result = CliRunner().invoke(register_stage.main, dvc_args("register"))
    assert result.exit_code == 1 and "tracking.alias" in result.output
