"""One proxy model and the training loop shared by the baseline (K=1, AGC off) and every IET proxy.

A proxy keeps to itself what IET does not average: optimizer state, LR schedule, AGC memory bank,
random generator. Its checkpoint is one safetensors file plus JSON metadata (no pickle)."""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import DDPMScheduler, UNet2DModel
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from pipeline import agc, taa
from pipeline.config import Params
from pipeline.io import atomic_path

LOG_EVERY = 10  # steps between curve points: per-step logging would dominate small runs


@dataclass
class Proxy:
    model: UNet2DModel
    ema: EMAModel
    optimizer: torch.optim.Optimizer
    lr_schedule: torch.optim.lr_scheduler.LRScheduler
    bank: torch.Tensor          # AGC running loss per timestep
    generator: torch.Generator  # batches, noise, timesteps, augmentation
    scaler: torch.amp.GradScaler  # fp16 loss scaling; disabled (a no-op) otherwise
    step: int = 0


@dataclass
class RoundCounts:
    """Per training-set position: how often drawn and how often AGC skipped it (reset each round)."""
    drawn: torch.Tensor
    skipped: torch.Tensor

    @classmethod
    def zeros(cls, n: int) -> "RoundCounts":
        return cls(torch.zeros(n, dtype=torch.long), torch.zeros(n, dtype=torch.long))


@dataclass
class Curve:
    rows: list[dict] = field(default_factory=list)


def new_proxy(init: UNet2DModel, params: Params, seed: int, device: torch.device | str = "cpu") -> Proxy:
    model = copy.deepcopy(init).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=params.train.lr)
    device_type = torch.device(device).type
    return Proxy(
        model=model,
        ema=EMAModel(model.parameters(), decay=params.train.ema_decay),
        optimizer=optimizer,
        lr_schedule=get_scheduler("constant_with_warmup", optimizer, num_warmup_steps=params.train.warmup_steps),
        bank=torch.zeros(params.model.num_train_timesteps),
        generator=torch.Generator().manual_seed(seed),
        scaler=torch.amp.GradScaler(device_type, enabled=params.train.mixed_precision == "fp16"),
    )


def _batches(shard: torch.Tensor, batch_size: int, generator: torch.Generator):
    """Endless stream of full batches from successive random permutations of the shard, so a
    shard smaller than the batch still gives full batches (the compute stays that of the baseline)."""
    buffer = shard[:0]
    while True:
        while buffer.numel() < batch_size:
            buffer = torch.cat([buffer, shard[torch.randperm(shard.numel(), generator=generator)]])
        yield buffer[:batch_size]
        buffer = buffer[batch_size:]


def train_steps(proxy: Proxy, images: torch.Tensor, shard: torch.Tensor, steps: int,
                noise_schedule: DDPMScheduler, params: Params, *, use_agc: bool,
                strength: torch.Tensor | None = None, counts: RoundCounts | None = None,
                desc: str = "train", on_curve=None) -> None:
    """Train `steps` optimizer steps on images[shard]. `strength` (TAA, per position, updated in
    place) is used only when given; `counts` collects draws/skips for MSR; `on_curve(row)` receives a
    curve point every LOG_EVERY steps."""
    model, gen, cfg = proxy.model, proxy.generator, params.train
    device = next(model.parameters()).device
    model.train()
    batches = _batches(shard, cfg.batch_size, gen)
    acc = {"loss": 0.0, "kept": 0.0, "n": 0}
    bar = tqdm(range(steps), desc=desc, unit="step", mininterval=1, leave=False)
    for i in bar:
        pos = next(batches)
        x0 = images[pos]
        if strength is not None:
            x0 = taa.augment(x0, strength[pos], params.taa, gen)
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, noise_schedule.config.num_train_timesteps, (x0.shape[0],), generator=gen)
        xt = noise_schedule.add_noise(x0, noise, t)
        try:
            losses, keep, loss = _backward(proxy, xt, t, noise, params, use_agc, device)
        except torch.OutOfMemoryError:
            raise MemoryError(f"{desc}: out of memory at step {proxy.step + 1} (batch {cfg.batch_size}); lower "
                              "train.batch_size or raise train.grad_accum; the last complete round is kept "
                              "and a re-run resumes from it") from None
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{desc}: loss is {loss.item()} at step {proxy.step + 1}; the last complete "
                                     "round is kept (a re-run resumes from it): lower train.lr, or use fp32")

        if use_agc:
            if strength is not None:
                strength[pos] = taa.update_strength(strength[pos], losses, proxy.bank[t], params.agc.tau, params.taa)
            proxy.bank = agc.update_bank(proxy.bank, t, losses, params.agc.bank_decay)
        if counts is not None:
            counts.drawn.index_add_(0, pos, torch.ones_like(pos))
            counts.skipped.index_add_(0, pos, (~keep).long())

        proxy.scaler.unscale_(proxy.optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        proxy.scaler.step(proxy.optimizer)
        proxy.scaler.update()
        proxy.lr_schedule.step()
        proxy.optimizer.zero_grad(set_to_none=True)
        proxy.ema.step(model.parameters())
        proxy.step += 1

        acc["loss"] += loss.item()
        acc["kept"] += keep.float().mean().item()
        acc["n"] += 1
        if acc["n"] == LOG_EVERY or i == steps - 1:
            row = {"step": proxy.step, "loss": acc["loss"] / acc["n"], "kept": acc["kept"] / acc["n"],
                   "bank_mean": proxy.bank.mean().item()}
            bar.set_postfix(loss=f"{row['loss']:.4f}", kept=f"{row['kept']:.2f}")
            if on_curve:
                on_curve(row)
            acc = {"loss": 0.0, "kept": 0.0, "n": 0}
    bar.close()


AUTOCAST = {"fp16": torch.float16, "bf16": torch.bfloat16}


def _backward(proxy: Proxy, xt, t, noise, params: Params, use_agc: bool, device):
    """Forward and backward of one optimizer step's batch, in train.grad_accum micro-batches
    (same gradient, less activation memory). Returns per-sample losses, the AGC keep mask and the
    step's loss: the mean over kept samples, as one full batch would give."""
    cfg, model = params.train, proxy.model
    amp = torch.autocast(device.type, dtype=AUTOCAST.get(cfg.mixed_precision, torch.float32),
                         enabled=cfg.mixed_precision != "fp32")

    def forward(sl):
        with amp:
            pred = model(xt[sl].to(device), t[sl].to(device)).sample
        return (pred.float() - noise[sl].to(device)).pow(2).mean(dim=(1, 2, 3)).cpu()

    def mask(losses, sl):
        return agc.keep_mask(losses.detach(), t[sl], proxy.bank, params.agc.tau) if use_agc \
            else torch.ones_like(losses, dtype=torch.bool)

    everything = slice(None)
    if cfg.grad_accum == 1:
        losses = forward(everything)
        keep = mask(losses, everything)
        loss = agc.masked_loss(losses, keep) if use_agc else losses.mean()
        if torch.isfinite(loss):
            proxy.scaler.scale(loss).backward()
        return losses, keep, loss
    # The kept count of the whole batch is known only after the last micro-batch: back-propagate
    # the sums, then divide the gradients once.
    parts, keeps = [], []
    for idx in torch.arange(len(t)).tensor_split(cfg.grad_accum):
        sl = slice(int(idx[0]), int(idx[-1]) + 1)
        losses = forward(sl)
        keep = mask(losses, sl)
        if torch.isfinite(losses).all():
            proxy.scaler.scale((losses * keep).sum()).backward()
        parts.append(losses.detach())
        keeps.append(keep)
    losses, keep = torch.cat(parts), torch.cat(keeps)
    kept = keep.sum().clamp(min=1)
    for p in model.parameters():
        if p.grad is not None:
            p.grad.div_(kept.to(p.grad.device))
    return losses, keep, (losses * keep).sum() / kept


# ---- checkpoints: safetensors for tensors, JSON for the rest ----

def proxy_tensors(proxy: Proxy) -> dict[str, torch.Tensor]:
    out = {f"model.{k}": v for k, v in proxy.model.state_dict().items()}
    out.update({f"ema.{i}": p for i, p in enumerate(proxy.ema.shadow_params)})
    for i, state in proxy.optimizer.state_dict()["state"].items():
        for k, v in state.items():
            out[f"optim.{i}.{k}"] = torch.as_tensor(v)
    out["bank"] = proxy.bank
    out["generator"] = proxy.generator.get_state()
    return {k: v.detach().cpu().contiguous() for k, v in out.items()}


def save_proxy(proxy: Proxy, path: str | Path) -> None:
    meta = {"step": proxy.step, "ema_step": proxy.ema.optimization_step, "scaler": proxy.scaler.state_dict(),
            "lr_schedule": proxy.lr_schedule.state_dict(),
            "param_groups": [{k: v for k, v in g.items() if k != "params"}
                             for g in proxy.optimizer.state_dict()["param_groups"]]}
    with atomic_path(path) as tmp:
        save_file(proxy_tensors(proxy), str(tmp), metadata={"meta": json.dumps(meta, default=str)})


def load_proxy(proxy: Proxy, path: str | Path) -> None:
    from safetensors import safe_open

    tensors = load_file(str(path))
    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["meta"])
    proxy.model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    for i, p in enumerate(proxy.ema.shadow_params):
        p.data.copy_(tensors[f"ema.{i}"])
    opt = proxy.optimizer.state_dict()
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        if key.startswith("optim."):
            _, i, name = key.split(".", 2)
            state.setdefault(int(i), {})[name] = v
    opt["state"] = state
    opt["param_groups"] = [{**g, **saved} for g, saved in zip(opt["param_groups"], meta["param_groups"])]
    proxy.optimizer.load_state_dict(opt)
    sched = {k: v for k, v in meta["lr_schedule"].items() if k != "lr_lambdas"}
    proxy.lr_schedule.load_state_dict({**proxy.lr_schedule.state_dict(), **sched})
    proxy.bank = tensors["bank"]
    proxy.generator.set_state(tensors["generator"])
    proxy.step = meta["step"]
    if meta.get("scaler"):
        proxy.scaler.load_state_dict(meta["scaler"])
    proxy.ema.optimization_step = meta["ema_step"]
