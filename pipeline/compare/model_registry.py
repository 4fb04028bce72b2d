"""The final models in the MLflow model registry (getting them back by URI is pipeline/core/fetch.py,
re-exported here: `from pipeline.compare.model_registry import load_diffusers`).

A model is logged as an MLflow pyfunc model whose artifact `pipeline/` is the diffusers
`save_pretrained` directory (model_index.json, unet/, scheduler/). Other code relies on that: an
MLflow model of this project holds a DDPMPipeline directory with model_index.json somewhere inside
its downloaded artifacts. `load_diffusers` turns a registry URI, a run URI or a local directory
into a `DDPMPipeline`; the pyfunc wrapper serves the same model as seeds -> images.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version as installed_version
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import mlflow  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from mlflow import MlflowClient  # noqa: E402
from mlflow.entities import LoggedModelOutput  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402
from mlflow.models import Model, ModelSignature  # noqa: E402
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec  # noqa: E402

from pipeline.core.fetch import FetchError, _not_found, fetched, find_pipeline_dir, load_diffusers  # noqa: E402,F401
from pipeline.core.store import StoreError  # noqa: E402

PIPELINE_ARTIFACT = "pipeline"      # artifact key and directory name of the save_pretrained folder
PROJECT_TAG = "iet_agc.project"     # on registered models this project created
PROJECT = "iet-agc"
DEFAULT_STEPS = 50
# Pinned from what is installed (cheap); letting MLflow infer them loads the model and takes seconds.
_REQUIREMENTS = ("torch", "diffusers", "accelerate", "safetensors", "numpy", "pandas", "pydantic",
                 "pyyaml", "tqdm", "mlflow")


class NameTaken(StoreError):
    """A registered model name that exists in the store and is not this project's."""


def requirements() -> list[str]:
    reqs = []
    for pkg in _REQUIREMENTS:
        try:
            reqs.append(f"{pkg}=={installed_version(pkg).split('+')[0]}")  # 2.13.0+cpu -> 2.13.0
        except PackageNotFoundError:
            reqs.append(pkg)
    return reqs


class DiffusersPipelineModel(mlflow.pyfunc.PythonModel):
    """pyfunc face of a saved DDPMPipeline: a DataFrame with a `seed` column -> uint8 images
    [N, H, W, C], one per seed (each image depends only on its seed); param `steps`: DDIM steps,
    at most the model's training timesteps."""

    def load_context(self, context):
        from diffusers import DDPMPipeline

        self.pipeline = DDPMPipeline.from_pretrained(context.artifacts[PIPELINE_ARTIFACT])

    def predict(self, context, model_input: pd.DataFrame, params=None):
        import torch

        from pipeline.core.data import to_uint8
        from pipeline.evaluate.sampling import sample

        unet, scheduler = self.pipeline.unet, self.pipeline.scheduler
        steps = min(int((params or {}).get("steps", DEFAULT_STEPS)), scheduler.config.num_train_timesteps)
        seeds = model_input["seed"] if isinstance(model_input, pd.DataFrame) else model_input
        images = torch.cat([sample(unet, scheduler, 1, steps, int(s), progress=False) for s in seeds])
        return to_uint8(images).permute(0, 2, 3, 1).numpy()


SIGNATURE = ModelSignature(inputs=Schema([ColSpec("long", "seed")]),
                           outputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1, -1))]),
                           params=ParamSchema([ParamSpec("steps", "long", DEFAULT_STEPS)]))


@contextmanager
def _quiet(logger: str):
    log = logging.getLogger(logger)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def log_pipeline(client: MlflowClient, run_id: str, model_dir: str | Path, name: str,
                 tags: dict | None = None) -> str:
    """Log the saved pipeline in `model_dir` as an MLflow model of run `run_id` (a finished run is
    fine); returns the logged model's id. Uses only `client`, never the global tracking URI."""
    model_dir = find_pipeline_dir(model_dir)
    run = client.get_run(run_id)
    logged = client.create_logged_model(run.info.experiment_id, name=name, source_run_id=run_id,
                                        tags={PROJECT_TAG: PROJECT, **{k: str(v) for k, v in (tags or {}).items()}},
                                        params=dict(run.data.params))
    try:
        with tempfile.TemporaryDirectory() as tmp:
            staged = Path(tmp) / PIPELINE_ARTIFACT  # MLflow names the artifact folder after its source
            shutil.copytree(model_dir, staged)
            # The library travels with the model, so the pyfunc loads where the project is not installed.
            code = Path(tmp) / "code" / "pipeline"
            shutil.copytree(Path(__file__).parents[1], code, ignore=shutil.ignore_patterns("__pycache__"))
            with _quiet("mlflow.pyfunc"):  # its warning about pickling python_model: that is our own class
                mlflow.pyfunc.save_model(
                    Path(tmp) / "model", python_model=DiffusersPipelineModel(),
                    artifacts={PIPELINE_ARTIFACT: str(staged)}, code_paths=[str(code)],
                    signature=SIGNATURE, input_example=pd.DataFrame({"seed": [0, 1]}),
                    pip_requirements=requirements(),
                    mlflow_model=Model(artifact_path=logged.artifact_location, model_uuid=logged.model_id,
                                       run_id=run_id, model_id=logged.model_id))
            client.log_model_artifacts(logged.model_id, str(Path(tmp) / "model"))
    except BaseException:
        client.finalize_logged_model(logged.model_id, "FAILED")
        raise
    client.finalize_logged_model(logged.model_id, "READY")
    client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=0)])
    return logged.model_id


def claim_names(client: MlflowClient, names: list[str]) -> None:
    """Create the registered models this project will add versions to, refusing (before anything is
    created) a name that exists without this project's tag: it belongs to someone else."""
    missing = []
    for name in names:
        try:
            model = client.get_registered_model(name)
        except MlflowException as err:
            if not _not_found(err):
                raise
            missing.append(name)
            continue
        if model.tags.get(PROJECT_TAG) != PROJECT:
            raise NameTaken(f"registered model '{name}' already exists in {client.tracking_uri} and was not "
                                f"created by this project (no tag {PROJECT_TAG}={PROJECT}); not adding versions "
                                "to it: set tracking.registry_name to another name")
    for name in missing:
        try:
            client.create_registered_model(name, tags={PROJECT_TAG: PROJECT},
                                           description="IET-AGC+ diffusion models (diffusers DDPMPipeline); "
                                           "load with pipeline.core.fetch.load_diffusers")
        except MlflowException as err:
            if err.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            claim_names(client, [name])  # created meanwhile, by a concurrent experiment or someone else


def register(client: MlflowClient, run_id: str, model_dir: str | Path, name: str, alias: str,
             label: str, tags: dict | None = None, description: str = "") -> dict:
    """Log `model_dir` under run `run_id`, add it as a new version of registered model `name` and
    point `alias` at it. Call claim_names first. Returns what registered.json records."""
    model_id = log_pipeline(client, run_id, model_dir, label, tags)
    source = client.get_logged_model(model_id).artifact_location
    # The store's location, not models:/<id>: the SQLite registry resolves models:/ URIs through the
    # global tracking URI, which need not be this client's.
    mv = client.create_model_version(name, source, run_id=run_id, model_id=model_id,
                                     tags={k: str(v) for k, v in (tags or {}).items()}, description=description)
    client.set_registered_model_alias(name, alias, mv.version)
    return {"name": name, "version": int(mv.version), "alias": alias, "run_id": run_id, "model_id": model_id,
            "model_uri": f"models:/{name}/{mv.version}", "alias_uri": f"models:/{name}@{alias}"}
