"""The weights a run starts from when model.init_from names a pretrained model: a local diffusers
directory (UNet2DModel or DDPMPipeline) or an MLflow model URI of this project, checked against the
params before any training."""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from pipeline.core.config import ConfigError, Params
from pipeline.core.io import local_path
from pipeline.core.models import build_scheduler, build_unet

if TYPE_CHECKING:  # diffusers is imported where a model is loaded (pipeline/core/models.py says why)
    from diffusers import DDPMScheduler, UNet2DModel


def initial_unet(params: Params, seed: int) -> UNet2DModel:
    """The weights every model of a run starts from: a fresh UNet, or the pretrained one named by
    model.init_from (a local diffusers directory or an MLflow model URI of this project)."""
    source = params.model.init_from
    if source is None:
        return build_unet(params.model, params.data.resolution, params.data.channels, seed)
    torch.manual_seed(seed)  # as build_unet: nothing after depends on what ran before
    path = local_path(source)
    if path is None:  # models:/, runs:/, ...: only then is MLflow needed
        from pipeline.core.fetch import fetched
        from pipeline.core.store import StoreError
        from pipeline.core.store import tracking_uri
        try:
            with fetched(source, tracking_uri(params.tracking)) as (path, _):
                unet, scheduler = load_model_dir(path, source)  # before path goes
        except StoreError as err:
            raise ConfigError(f"model.init_from: {err}") from None
    else:
        unet, scheduler = load_model_dir(path, source)
    _check_fits(unet, scheduler, params)
    return unet.train()


def load_model_dir(root: Path, source: str, key: str = "model.init_from") -> tuple[UNet2DModel, DDPMScheduler | None]:
    """The UNet (float32) and scheduler (None for a bare UNet) of a UNet2DModel or DDPMPipeline
    directory at or below `root`; errors name the option `key` and `source`."""
    return _load_unet(*_find_model(root, source, key), source, key)


def _find_model(root: Path, source: str, key: str) -> tuple[Path, Path | None]:
    """(UNet directory, scheduler directory or None) of a bare UNet2DModel directory or a
    DDPMPipeline directory at or below `root` (an MLflow model wraps the pipeline in its own layout)."""
    if not root.exists():
        raise FileNotFoundError(f"{key}: {source}: no such file or directory")
    if (root / "config.json").is_file():
        return root, None
    pipelines = sorted((p.parent for p in root.rglob("model_index.json") if (p.parent / "unet").is_dir()),
                       key=lambda d: (len(d.parts), str(d)))
    if not pipelines:
        raise FileNotFoundError(f"{key}: {source}: not a diffusers model (neither a UNet2DModel "
                                "directory with config.json nor a DDPMPipeline directory with "
                                "model_index.json and unet/)")
    found = pipelines[0]
    return found / "unet", (found / "scheduler" if (found / "scheduler").is_dir() else None)


def _load_unet(unet_dir: Path, scheduler_dir: Path | None, source: str,
               key: str) -> tuple[UNet2DModel, DDPMScheduler | None]:
    config_file = unet_dir / "config.json"
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"{key}: {source}: {config_file} is not readable JSON ({err})") from None
    kind = config.get("_class_name") if isinstance(config, dict) else None
    if kind != "UNet2DModel":
        what = f"holds a {kind}" if kind else f"{config_file} names no model class (_class_name)"
        raise ConfigError(f"{key}: {source}: {what}, not the unconditional UNet2DModel "
                          "this project trains")
    from diffusers import DDPMScheduler, UNet2DModel

    try:
        unet = UNet2DModel.from_pretrained(str(unet_dir), torch_dtype=torch.float32)
        scheduler = DDPMScheduler.from_pretrained(str(scheduler_dir)) if scheduler_dir else None
    except (OSError, ValueError, TypeError, KeyError) as err:  # diffusers' errors for missing or broken files
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"{key}: {source}: cannot be loaded ({first})") from None
    return unet, scheduler


def _check_fits(unet: UNet2DModel, scheduler: DDPMScheduler | None, params: Params) -> None:
    cfg, source = unet.config, params.model.init_from
    size = cfg.sample_size if isinstance(cfg.sample_size, int) else tuple(cfg.sample_size)
    wrong = []
    if size not in (params.data.resolution, (params.data.resolution,) * 2):
        wrong.append(f"its sample_size is {size}, data.resolution is {params.data.resolution}")
    for key in ("in_channels", "out_channels"):
        if cfg[key] != params.data.channels:
            wrong.append(f"its {key} is {cfg[key]}, data.channels is {params.data.channels}")
    if scheduler is not None:
        theirs = scheduler.config.num_train_timesteps
        if theirs != params.model.num_train_timesteps:
            wrong.append(f"its scheduler has num_train_timesteps {theirs}, "
                         f"model.num_train_timesteps is {params.model.num_train_timesteps}")
        ours = build_scheduler(params.model).config
        differ = [k for k in ("beta_schedule", "beta_start", "beta_end", "prediction_type")
                  if scheduler.config.get(k) != ours[k]]
        if differ and not wrong:
            # the project trains with its own linear epsilon schedule; say so rather than fail
            warnings.warn(f"model.init_from: {source}: its scheduler differs in {', '.join(differ)}; "
                          "fine-tuning uses this project's DDPM schedule", stacklevel=3)
    if wrong:
        raise ConfigError(f"model.init_from: {source} does not fit these params: " + "; ".join(wrong))
