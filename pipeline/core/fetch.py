"""Models of this project by URI: a local diffusers pipeline directory, or an MLflow model
(models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN/PATH) downloaded from the store. Apart from
registering (pipeline/compare/model_registry.py), so that training from `model.init_from` needs none of the
logging and serving code.
"""
from __future__ import annotations

import os
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import mlflow  # noqa: E402
from mlflow import MlflowClient  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402

from pipeline.core.io import local_path  # noqa: E402
from pipeline.core.store import StoreError, check_store, fail_fast_http  # noqa: E402


class FetchError(StoreError):
    """A model that cannot be had by its URI (malformed, no such model, version or alias, nothing to
    download, no pipeline inside); the message names the store, model or version."""


def find_pipeline_dir(root: str | Path) -> Path:
    """The diffusers pipeline directory at or below `root` (the shallowest model_index.json)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such model directory")
    if (root / "model_index.json").is_file():
        return root
    found = sorted(root.rglob("model_index.json"), key=lambda p: (len(p.parts), str(p)))
    if not found:
        raise FileNotFoundError(f"{root}: not a diffusers pipeline (no model_index.json inside)")
    return found[0].parent


def _not_found(err: MlflowException) -> bool:
    return err.error_code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND")


_MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>[^/@]+))?$")


def _describe(client: MlflowClient, name: str) -> str:
    versions = sorted(int(v.version) for v in client.search_model_versions(f"name='{name}'"))
    aliases = client.get_registered_model(name).aliases
    return (f"versions: {', '.join(map(str, versions)) or 'none'}; aliases: "
            + (", ".join(f"{a} -> {v}" for a, v in sorted(aliases.items())) or "none"))


def _download_uri(client: MlflowClient, uri: str) -> tuple[str, str]:
    """models:/NAME@ALIAS, models:/NAME/VERSION, models:/NAME/latest or models:/<logged model id>
    -> (artifact location, what it resolved to)."""
    m = _MODELS_URI.match(uri)
    if not m:
        raise FetchError(f"{uri}: not a model URI (models:/NAME@ALIAS or models:/NAME/VERSION)")
    name, alias, ver = m["name"], m["alias"], m["version"]
    if alias is None and ver is None and not name.startswith("m-"):
        raise FetchError(f"{uri}: give a version or an alias (models:/{name}/VERSION or models:/{name}@ALIAS)")
    if alias is None and ver is None:  # models:/m-... : a logged model, registered or not
        try:
            return client.get_logged_model(name).artifact_location, f"logged model {name}"
        except MlflowException as err:
            if not _not_found(err):
                raise
            raise FetchError(f"{uri}: no logged model '{name}' in {client.tracking_uri}") from None
    mv = _version(client, uri, _registered(client, uri, name), alias, ver)
    return client.get_model_version_download_uri(name, mv.version), f"{name} version {mv.version}"


def _registered(client: MlflowClient, uri: str, name: str):
    try:
        return client.get_registered_model(name)
    except MlflowException as err:
        if not _not_found(err):
            raise
        known = [r.name for r in client.search_registered_models(max_results=20)]
        raise FetchError(f"{uri}: no registered model '{name}' in {client.tracking_uri} "
                         f"(registered: {', '.join(known) or 'none'})") from None


def _version(client: MlflowClient, uri: str, model, alias: str | None, ver: str | None):
    """The model version an alias, a number or 'latest' names."""
    name = model.name
    if alias is not None and alias not in model.aliases:  # the store answers this with a generic error
        raise FetchError(f"{uri}: registered model '{name}' has no alias '{alias}' ({_describe(client, name)})")
    try:
        if alias is not None:
            return client.get_model_version_by_alias(name, alias)
        if ver == "latest":
            versions = client.search_model_versions(f"name='{name}'")
            if not versions:
                raise FetchError(f"{uri}: registered model '{name}' has no versions")
            return max(versions, key=lambda v: int(v.version))
        if ver.isdigit():
            return client.get_model_version(name, ver)
        raise FetchError(f"{uri}: version must be a number or 'latest' (or use models:/{name}@ALIAS)")
    except MlflowException as err:
        if not _not_found(err):
            raise
        raise FetchError(f"{uri}: registered model '{name}' has no version {ver} "
                         f"({_describe(client, name)})") from None


def _default_tracking_uri() -> str:
    from pipeline.core.config import TrackingConfig
    from pipeline.core.store import tracking_uri

    return tracking_uri(TrackingConfig())


@contextmanager
def fetched(uri: str | Path, tracking_uri: str | None = None) -> Iterator[tuple[Path, str]]:
    """The pipeline directory of `uri` on local disk and a label saying what it is. A local
    directory is used in place; a models:/ or runs:/ URI is downloaded into a temporary directory
    that is removed afterwards."""
    text = str(uri)
    path = local_path(text)
    if path is not None:
        yield find_pipeline_dir(path), str(path)
        return
    tracking_uri = tracking_uri or _default_tracking_uri()
    fail_fast_http()
    check_store(tracking_uri, must_exist=True)
    client = MlflowClient(tracking_uri=tracking_uri)
    source, label = _download_uri(client, text) if text.startswith("models:") else (text, text)
    with tempfile.TemporaryDirectory(prefix="iet-agc-model-") as tmp:
        try:
            local = mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=tmp, tracking_uri=tracking_uri)
        except MlflowException as err:
            raise FetchError(f"{text}: cannot download the model from {tracking_uri} ({err.message})") from None
        try:
            path = find_pipeline_dir(local)
        except FileNotFoundError:
            raise FetchError(f"{text}: holds no diffusers pipeline (no model_index.json)") from None
        yield path, label


def load_diffusers(uri: str | Path, tracking_uri: str | None = None):
    """One call from a registered model (models:/iet-agc@candidate, models:/iet-agc/3), a run
    artifact (runs:/RUN/path) or a local directory to a diffusers DDPMPipeline.
    `tracking_uri`: default MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the repository root."""
    from diffusers import DDPMPipeline

    with fetched(uri, tracking_uri) as (path, _):
        return DDPMPipeline.from_pretrained(str(path))
