"""The diffusers UNet and noise schedules every model of the project is built from."""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from urllib.parse import urlparse

import torch
from diffusers import DDIMScheduler, DDPMPipeline, DDPMScheduler, UNet2DModel

from pipeline.config import ConfigError, ModelConfig, Params
from pipeline.io import apply_umask


def build_unet(cfg: ModelConfig, resolution: int, channels: int, seed: int) -> UNet2DModel:
    torch.manual_seed(seed)
    levels = len(cfg.block_out_channels)
    return UNet2DModel(
        sample_size=resolution,
        in_channels=channels,
        out_channels=channels,
        layers_per_block=cfg.layers_per_block,
        block_out_channels=cfg.block_out_channels,
        down_block_types=("DownBlock2D",) * levels,
        up_block_types=("UpBlock2D",) * levels,
        add_attention=cfg.attention,  # self-attention in the mid block, at the lowest resolution
        attention_head_dim=8,
        norm_num_groups=8,
    )


def initial_unet(params: Params, seed: int) -> UNet2DModel:
    """The weights every model of a run starts from: a fresh UNet, or the pretrained one named by
    model.init_from (a local diffusers directory or an MLflow model URI of this project)."""
    source = params.model.init_from
    if source is None:
        return build_unet(params.model, params.data.resolution, params.data.channels, seed)
    torch.manual_seed(seed)  # as build_unet: nothing after depends on what ran before
    scheme = urlparse(source).scheme
    if len(scheme) > 1 and scheme != "file":  # models:/, runs:/, ...; one letter is a Windows drive
        from pipeline.registry import RegistryError, fetched
        from pipeline.tracking import tracking_uri
        try:
            with fetched(source, tracking_uri(params.tracking)) as (path, _):
                unet, scheduler = _load_unet(*_find_model(path, source), source)  # before path goes
        except RegistryError as err:
            raise ConfigError(f"model.init_from: {err}") from None
    else:
        path = Path(urlparse(source).path if scheme == "file" else source)
        unet, scheduler = _load_unet(*_find_model(path, source), source)
    _check_fits(unet, scheduler, params)
    return unet.train()


def _find_model(root: Path, source: str) -> tuple[Path, Path | None]:
    """(UNet directory, scheduler directory or None) of a bare UNet2DModel directory or a
    DDPMPipeline directory at or below `root` (an MLflow model wraps the pipeline in its own layout)."""
    if not root.exists():
        raise FileNotFoundError(f"model.init_from: {source}: no such file or directory")
    if (root / "config.json").is_file():
        return root, None
    pipelines = sorted((p.parent for p in root.rglob("model_index.json") if (p.parent / "unet").is_dir()),
                       key=lambda d: (len(d.parts), str(d)))
    if not pipelines:
        raise FileNotFoundError(f"model.init_from: {source}: not a diffusers model (neither a UNet2DModel "
                                "directory with config.json nor a DDPMPipeline directory with "
                                "model_index.json and unet/)")
    found = pipelines[0]
    return found / "unet", (found / "scheduler" if (found / "scheduler").is_dir() else None)


def _load_unet(unet_dir: Path, scheduler_dir: Path | None,
               source: str) -> tuple[UNet2DModel, DDPMScheduler | None]:
    config_file = unet_dir / "config.json"
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"model.init_from: {source}: {config_file} is not readable JSON ({err})") from None
    kind = config.get("_class_name") if isinstance(config, dict) else None
    if kind != "UNet2DModel":
        what = f"holds a {kind}" if kind else f"{config_file} names no model class (_class_name)"
        raise ConfigError(f"model.init_from: {source}: {what}, not the unconditional UNet2DModel "
                          "this project trains")
    try:
        unet = UNet2DModel.from_pretrained(str(unet_dir), torch_dtype=torch.float32)
        scheduler = DDPMScheduler.from_pretrained(str(scheduler_dir)) if scheduler_dir else None
    except (OSError, ValueError, TypeError, KeyError) as err:  # diffusers' errors for missing or broken files
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"model.init_from: {source}: cannot be loaded ({first})") from None
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


def build_scheduler(cfg: ModelConfig) -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=cfg.num_train_timesteps, beta_schedule="linear",
                         prediction_type="epsilon")


def save_pipeline(unet: UNet2DModel, scheduler: DDPMScheduler, path: str | Path) -> None:
    """diffusers layout: loads back with DDPMPipeline.from_pretrained(path)."""
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(str(path), safe_serialization=True)
    apply_umask(path)


def load_pipeline(path: str | Path) -> tuple[UNet2DModel, DDPMScheduler]:
    path = Path(path)
    if not (path / "unet").is_dir():
        raise FileNotFoundError(f"{path}: not a saved diffusion model (no unet/ inside)")
    unet = UNet2DModel.from_pretrained(str(path / "unet"))
    scheduler = DDPMScheduler.from_pretrained(str(path / "scheduler"))
    return unet, scheduler


@torch.no_grad()
def sample(unet: UNet2DModel, scheduler: DDPMScheduler, n: int, steps: int, seed: int,
           batch_size: int = 256, progress: bool = True, desc: str = "sampling") -> torch.Tensor:
    """DDIM, eta 0, as the official evaluation. Returns images in [-1, 1] on the CPU."""
    from tqdm.auto import tqdm

    ddim = DDIMScheduler.from_config(scheduler.config)
    ddim.set_timesteps(steps)
    device = next(unet.parameters()).device
    unet.eval()
    generator = torch.Generator().manual_seed(seed)
    c, r = unet.config.in_channels, unet.config.sample_size
    out = []
    with tqdm(total=n * steps, desc=desc, unit="img-step", disable=not progress, mininterval=1) as bar:
        for start in range(0, n, batch_size):
            x = torch.randn(min(batch_size, n - start), c, r, r, generator=generator).to(device)
            for t in ddim.timesteps:
                eps = unet(x, t).sample
                x = ddim.step(eps, t, x, eta=0.0).prev_sample
                bar.update(x.shape[0])
            out.append(x.clamp(-1, 1).cpu())
    return torch.cat(out)
