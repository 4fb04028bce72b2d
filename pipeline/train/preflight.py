"""What the validate stage checks of the machine, beyond the params' own rules: that the training
launcher is a command here, and that the run fits in this machine's memory. Both failed only after
DVC had deleted a stage's outputs: `pyton: command not found` (exit 127), or an allocation error
that named no key."""
from __future__ import annotations

import shlex
import shutil

from pipeline.core.config import ConfigError, Params

GIB = 2**30
FLOAT = 4  # bytes: every array and weight the stages compute with is float32


def check_launcher(launcher: str) -> None:
    """train.launcher's command (`python`, `accelerate launch ...`) must be found as DVC's shell
    will look for it: on PATH, or a path from the repository."""
    try:
        words = shlex.split(launcher)
    except ValueError as err:
        raise ConfigError(f"train.launcher: not a command line ({err}) (got {launcher!r})") from None
    if not words:
        raise ConfigError("train.launcher: must name a command, e.g. python (got '')")
    if shutil.which(words[0]) is None:
        raise ConfigError(f"train.launcher: no command '{words[0]}' here (not on PATH, nor a path to a "
                          f"program) (got {launcher!r})")


def unet_parameters(p: Params) -> int:
    """The UNet's parameter count, built on torch's meta device: no memory, whatever the widths."""
    import torch

    from pipeline.core.models import build_unet

    with torch.device("meta"):
        unet = build_unet(p.model, p.data.resolution, p.data.channels, seed=0)
    return sum(t.numel() for t in unet.parameters())


def memory_needs(p: Params) -> dict[str, float]:
    """A rough lower bound of the bytes a run holds at once, by the key that sets each part:
    the proxies' weights with their gradients, Adam's two moments and the EMA (5 copies each) and
    the averaged model; every proxy's weights at each of the round's mid checkpoints; the activations one batch keeps for the backward
    pass (at least four maps a residual block, 2 x layers_per_block + 1 blocks a level, both paths);
    the training images as float32 beside their uint8 copy; the evaluation's samples."""
    m, d = p.model, p.data
    pixels = d.channels * d.resolution**2
    weights = unet_parameters(p) * FLOAT if m.init_from is None else 0  # a pretrained one is checked on load
    extra = d.train_samples - d.train_size
    data_key = "data.duplicates.copies" if extra > d.train_size else "data.train_size"
    maps = sum((d.resolution // 2**i) ** 2 * c for i, c in enumerate(m.block_out_channels))
    return {
        "model.block_out_channels": weights * (5 * p.iet.shards + 1)
        + p.train.batch_size * maps * 4 * (2 * m.layers_per_block + 1) * 2 * FLOAT,
        "iet.checkpoints_per_round": weights * p.iet.shards * (p.iet.checkpoints_per_round - 1),
        data_key: d.train_samples * (pixels * (FLOAT + 1) + 16),
        "eval.num_samples": p.eval.num_samples * pixels * FLOAT * 2,
    }


# The parts of memory_needs a GPU holds (train.device cuda): the proxies, their optimizer state and
# EMA, and one batch's activations; the data, the mid-round checkpoints and the samples stay in RAM.
ON_DEVICE = ("model.block_out_channels",)


def check_memory(p: Params, total: int | None = None, device=None, device_total: int | None = None) -> None:
    """Refuse a run whose rough lower bound (memory_needs) exceeds the memory that holds it, naming
    the key behind the largest part: with a GPU, the parts it holds against its memory and the rest
    against the machine's."""
    import psutil

    from pipeline.core.config import resolve_device

    needs = memory_needs(p)
    device = device or resolve_device(p.train.device)
    if device.type == "cuda":
        import torch

        device_total = device_total or torch.cuda.get_device_properties(device).total_memory
        _refuse_beyond({k: v for k, v in needs.items() if k in ON_DEVICE}, device_total, f"GPU {device}'s")
        needs = {k: v for k, v in needs.items() if k not in ON_DEVICE}
    _refuse_beyond(needs, total or psutil.virtual_memory().total, "this machine's")


def _refuse_beyond(needs: dict[str, float], total: int, whose: str) -> None:
    if sum(needs.values()) > total:
        key = max(needs, key=needs.get)
        parts = ", ".join(f"{k} {v / GIB:.3g} GiB" for k, v in needs.items())
        raise ConfigError(f"{key}: the run needs at least {sum(needs.values()) / GIB:.3g} GiB of memory ({parts}), "
                          f"more than {whose} {total / GIB:.3g} GiB")


def check_machine(p: Params) -> None:
    check_launcher(p.train.launcher)
    check_memory(p)


def check_saved_model(unet_config, scheduler_config, batch: int, where) -> None:
    """A saved model's config read before sampling allocates anything from it: at least one
    training timestep (none made a ZeroDivisionError), a positive sample size, and one batch's
    feature maps at the first level (ten of them, a low count for a UNet's forward pass) within the
    machine's memory (a sample_size of 200000 asked torch for terabytes)."""
    import psutil

    if scheduler_config.get("num_train_timesteps", 0) < 1:
        raise ConfigError(f"{where}/scheduler/scheduler_config.json: num_train_timesteps must be at least 1 "
                          f"(got {scheduler_config.get('num_train_timesteps')})")
    size = unet_config.get("sample_size")
    size = max(size) if isinstance(size, (list, tuple)) else size
    if not isinstance(size, int) or size < 1:
        raise ConfigError(f"{where}/unet/config.json: sample_size must be a positive image size (got {size!r})")
    width = max(unet_config.get("block_out_channels") or [1])
    need, total = batch * size**2 * width * FLOAT * 10, psutil.virtual_memory().total
    if need > total:
        raise ConfigError(f"{where}/unet/config.json: sample_size {size} needs at least {need / GIB:.3g} GiB "
                          f"for a batch of {batch}, more than this machine's {total / GIB:.3g} GiB")
