"""The diffusers UNet and noise schedules every model of the project is built from, and the
project's saved-model layout (diffusers DDPMPipeline directories). Pretrained models to fine-tune
are pipeline/core/pretrained.py; sampling is pipeline/evaluate/sampling.py."""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from pipeline.core.config import ModelConfig
from pipeline.core.io import apply_umask, unreadable

# diffusers (seconds to import) only where a model is built: a stage that builds none, such as a
# one-shard run's profile, starts without it
if TYPE_CHECKING:
    from diffusers import DDPMScheduler, UNet2DModel


def build_unet(cfg: ModelConfig, resolution: int, channels: int, seed: int) -> UNet2DModel:
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    attn = cfg.attention_levels(resolution)  # the up blocks list the levels from the lowest resolution
    return UNet2DModel(
        sample_size=resolution,
        in_channels=channels,
        out_channels=channels,
        layers_per_block=cfg.layers_per_block,
        block_out_channels=cfg.block_out_channels,
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
        add_attention=cfg.attention,  # self-attention in the mid block, at the lowest resolution
        attention_head_dim=cfg.attention_head_dim,
        norm_num_groups=cfg.norm_groups,
        dropout=cfg.dropout,
    )


def build_scheduler(cfg: ModelConfig) -> DDPMScheduler:
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=cfg.num_train_timesteps, beta_schedule="linear",
                         prediction_type="epsilon")


def save_pipeline(unet: UNet2DModel, scheduler: DDPMScheduler, path: str | Path) -> None:
    """diffusers layout: loads back with DDPMPipeline.from_pretrained(path)."""
    from diffusers import DDPMPipeline

    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(str(path), safe_serialization=True)
    apply_umask(path)


def load_pipeline(path: str | Path) -> tuple[UNet2DModel, DDPMScheduler]:
    from diffusers import DDPMScheduler, UNet2DModel

    path = Path(path)
    if not (path / "unet").is_dir():
        raise FileNotFoundError(f"{path}: not a saved diffusion model (no unet/ inside)")
    try:
        unet = UNet2DModel.from_pretrained(str(path / "unet"))
        scheduler = DDPMScheduler.from_pretrained(str(path / "scheduler"))
    except Exception as err:  # diffusers raises OSError, ValueError, SafetensorError, ... with long tracebacks
        raise unreadable(_unreadable_file(path) or path, err) from None
    return unet, scheduler


def _unreadable_file(path: Path) -> Path | None:
    """The first file of a saved model that does not parse, to name it."""
    from safetensors import safe_open

    for file in sorted(path.rglob("*.json")):
        try:
            json.loads(file.read_text())
        except (OSError, ValueError):
            return file
    for file in sorted(path.rglob("*.safetensors")):
        try:
            with safe_open(str(file), "pt") as f:
                for key in f.keys():
                    f.get_slice(key)
        except Exception:  # safetensors' own error type, or an OSError
            return file
    return None
