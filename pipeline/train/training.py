"""One proxy model and the training loop shared by the baseline (K=1, no mitigation) and every IET
proxy; the mitigations act through their hooks (pipeline/mitigation).

A proxy keeps to itself what IET does not average: optimizer state, LR schedule, random generator
(a mitigation's per-proxy state, such as AGC's bank, lives with the mitigation). Its checkpoint
format is pipeline/core/checkpoint.py's."""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from pipeline.core.config import Params
from pipeline.mitigation import Mitigations, Step

if TYPE_CHECKING:  # pipeline/core/models.py says why not at run time
    from diffusers import DDPMScheduler, UNet2DModel
    from diffusers.training_utils import EMAModel

LOG_EVERY = 10  # steps between curve points: per-step logging would dominate small runs


@dataclass
class Proxy:
    model: UNet2DModel
    ema: EMAModel
    optimizer: torch.optim.Optimizer
    lr_schedule: torch.optim.lr_scheduler.LRScheduler
    generator: torch.Generator  # batches, noise, timesteps, augmentation; on the model's device (on a CPU, the CPU one)
    scaler: torch.amp.GradScaler  # fp16 loss scaling; disabled (a no-op) otherwise
    step: int = 0


@dataclass
class RoundCounts:
    """Per training-set position: how often drawn and how often AGC skipped it (reset each round)."""
    drawn: torch.Tensor
    skipped: torch.Tensor

    @classmethod
    def zeros(cls, n: int, device: torch.device | str = "cpu") -> "RoundCounts":
        return cls(torch.zeros(n, dtype=torch.long, device=device), torch.zeros(n, dtype=torch.long, device=device))

    def add(self, positions: torch.Tensor, keep: torch.Tensor) -> None:
        self.drawn.index_add_(0, positions, torch.ones_like(positions))
        self.skipped.index_add_(0, positions, (~keep).long())


def warmup_steps(params: Params, steps: int) -> int:
    """LR warmup of a model that takes `steps` optimizer steps: train.warmup_share of them, so the
    baseline and every proxy warm up for the same share of their training (a fixed count would eat
    a third of a short proxy's)."""
    return round(params.train.warmup_share * steps)


def new_proxy(init: UNet2DModel, params: Params, seed: int, device: torch.device | str = "cpu",
              steps: int = 0) -> Proxy:
    """A proxy that will take `steps` optimizer steps in all (its warmup is a share of them)."""
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    model = copy.deepcopy(init).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=params.train.lr)
    device = torch.device(device)
    return Proxy(
        model=model,
        # foreach: one kernel for all parameters on an accelerator; the CPU keeps the per-tensor update,
        # whose rounding the pinned weights were made with
        ema=EMAModel(model.parameters(), decay=params.train.ema_decay, foreach=device.type != "cpu"),
        optimizer=optimizer,
        lr_schedule=get_scheduler("constant_with_warmup", optimizer, num_warmup_steps=warmup_steps(params, steps)),
        # draws on the device: no batch, noise or timestep is made on the host and copied over
        generator=torch.Generator(device).manual_seed(seed),
        scaler=torch.amp.GradScaler(device.type, enabled=params.train.mixed_precision == "fp16"),
    )


def _batches(shard: torch.Tensor, batch_size: int, generator: torch.Generator):
    """Endless epochs of the shard: each a fresh random permutation cut into full batches, the
    remainder dropped (drop_last, as the official loader), so that no batch repeats a sample; a
    shard smaller than the batch is one batch of itself an epoch."""
    size = min(batch_size, shard.numel())
    if size == 0:
        raise ValueError("a proxy with steps to take has no training samples in its shard")
    while True:
        order = shard[torch.randperm(shard.numel(), generator=generator, device=shard.device)]
        for start in range(0, order.numel() - size + 1, size):
            yield order[start:start + size]


@dataclass(frozen=True)
class Batch:
    """One proxy's input to one optimizer step."""
    positions: torch.Tensor  # training-set positions
    xt: torch.Tensor         # noisy images
    target: torch.Tensor     # what the prediction is regressed on: the noise added (plain DDPM), or a mitigation's
    t: torch.Tensor          # timesteps


def draw(proxy: Proxy, k: int, positions: torch.Tensor, images: torch.Tensor, noise_schedule: DDPMScheduler,
         mitigations: Mitigations) -> Batch:
    """Proxy k's step input, from its own generator: augmentation, then noise, then timesteps; the
    objective (noisy input and target) is the mitigations' (plain DDPM unless one sets it)."""
    gen = proxy.generator
    x0 = mitigations.transform(k, images[positions], positions, gen)
    noise = torch.randn(x0.shape, generator=gen, device=gen.device)
    t = torch.randint(0, noise_schedule.config.num_train_timesteps, (x0.shape[0],), generator=gen, device=gen.device)
    return Batch(positions, *mitigations.noised(k, x0, positions, t, noise, noise_schedule), t=t)


def train_steps(group, images: torch.Tensor, shards: dict[int, torch.Tensor], steps: int,
                noise_schedule: DDPMScheduler, params: Params, mitigations: Mitigations, counts: RoundCounts,
                desc: str = "train", on_curve=None, on_step=None) -> None:
    """The training step, `steps` times, for the proxies of `group` (OneProxy, or stacked.Stacked:
    several proxies in one vmapped forward and backward): draw, forward, keep mask, masked loss,
    backward, clip, update, EMA, counts. Proxy k trains on images[shards[k]]; `counts` collects draws
    and skips; `on_curve(k, row)` receives a curve point every LOG_EVERY steps, `on_step(steps done)`
    is called after every step. images, shards, counts and the mitigations' state are on the
    proxies' device: a step never waits for the host, which reads back only the curve points."""
    proxies = group.proxies
    streams = {k: _batches(shards[k], params.train.batch_size, proxy.generator) for k, proxy in proxies.items()}
    logs = {k: _CurveLog(proxy.generator.device) for k, proxy in proxies.items()}
    group.train()
    bar = tqdm(range(steps), desc=desc, unit="step", mininterval=1, leave=False)
    # the authors' TAA queue: a draw gives no gradient, only evidence; the proxy steps on queued batches
    evidence_only = not mitigations.trains_draws
    for i in bar:
        batches = {k: draw(proxy, k, next(streams[k]), images, noise_schedule, mitigations)
                   for k, proxy in proxies.items()}
        results = (group.evidence if evidence_only else group.forward_backward)(batches, mitigations.keep, desc)
        for k, (losses, keep, _) in results.items():
            mitigations.observe(k, Step(batches[k].positions, batches[k].t, losses, keep))
            counts.add(batches[k].positions, keep)
        if evidence_only:
            queue_steps(group, noise_schedule, params, mitigations)
        else:
            group.update(params.train.grad_clip)
        if on_step:
            on_step(i + 1)
        for k, (_, keep, loss) in results.items():
            logs[k].add(loss, keep, proxies[k].step)
            if logs[k].n == LOG_EVERY or i == steps - 1:
                row = {"step": proxies[k].step, **logs[k].read(desc), **mitigations.curve(k)}
                bar.set_postfix(loss=f"{row['loss']:.4f}", kept=f"{row['kept']:.2f}")
                if on_curve:
                    on_curve(k, row)
    bar.close()


def queue_steps(group, noise_schedule: DDPMScheduler, params: Params, mitigations: Mitigations) -> None:
    """One optimizer step for each proxy of `group` whose mitigations queue a batch now (plain
    DDPM objective unless a mitigation sets it, mean loss), its noise and timesteps from its own
    generator."""
    for k, proxy in group.proxies.items():
        if (queued := mitigations.queued(k, proxy.generator)) is None:
            continue
        positions, x0 = queued
        gen = proxy.generator
        noise = torch.randn(x0.shape, generator=gen, device=gen.device)
        t = torch.randint(0, noise_schedule.config.num_train_timesteps, (x0.shape[0],), generator=gen,
                          device=gen.device)
        xt, target = mitigations.noised(k, x0, positions, t, noise, noise_schedule)
        backward(proxy, xt, t, target, params)
        update(proxy, params.train.grad_clip)


def diverged(desc: str, step: int | str, loss="not finite") -> FloatingPointError:
    """The error a non-finite training loss stops the run with (the stage prints it in one line)."""
    return FloatingPointError(f"{desc}: loss is {loss} at step {step}; the last complete round is kept "
                              "(a re-run resumes from it): lower train.lr, or use fp32")


class _CurveLog:
    """Running sums of a curve point, kept on the device and read back once per point (`read`: the
    step's only host synchronisation). Float64, summed in step order: the same values as Python
    floats summed step by step. On an accelerator it also notes the first step whose loss was not
    finite (the CPU checks every step, for free), reported when the point is read."""

    def __init__(self, device: torch.device):
        self.sums = torch.zeros(2, dtype=torch.float64, device=device)
        self.first_bad = torch.full((), -1.0, dtype=torch.float64, device=device)
        self.n = 0

    def add(self, loss: torch.Tensor, keep: torch.Tensor, step: int) -> None:
        self.sums += torch.stack([loss.detach().double(), keep.float().mean().double()])
        if loss.device.type != "cpu":
            self.first_bad = torch.where((self.first_bad < 0) & ~torch.isfinite(loss.detach()), step, self.first_bad)
        self.n += 1

    def read(self, desc: str) -> dict[str, float]:
        loss, kept, bad = torch.cat([self.sums / self.n, self.first_bad[None]]).tolist()
        if bad >= 0:
            raise diverged(desc, int(bad))
        self.sums.zero_()
        self.n = 0
        return {"loss": loss, "kept": kept}


def finite(x: torch.Tensor) -> bool:
    """Whether x is finite, asked only on the CPU (free there); on an accelerator the question would
    stall the step, so it is taken as yes and _CurveLog catches a non-finite loss a few steps later."""
    return x.device.type != "cpu" or bool(torch.isfinite(x).all())


def advance(proxy: Proxy, weights) -> None:
    """What follows every proxy's update: its LR schedule, its EMA of `weights`, its step count."""
    with warnings.catch_warnings():  # a stacked proxy's own optimizer does not step: the stack's did
        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)` before")
        proxy.lr_schedule.step()
    proxy.ema.step(weights)
    proxy.step += 1


def update(proxy: Proxy, grad_clip: float) -> None:
    """Clip the gradient, step the optimizer (through the fp16 loss scaler), then `advance`."""
    proxy.scaler.unscale_(proxy.optimizer)
    torch.nn.utils.clip_grad_norm_(proxy.model.parameters(), grad_clip)
    proxy.scaler.step(proxy.optimizer)
    proxy.scaler.update()
    proxy.optimizer.zero_grad(set_to_none=True)
    advance(proxy, proxy.model.parameters())


class OneProxy:
    """A group of one proxy for train_steps: its own forward and backward, in train.grad_accum
    micro-batches."""

    def __init__(self, k: int, proxy: Proxy, params: Params):
        self.proxies, self.params = {k: proxy}, params

    def train(self) -> None:
        for proxy in self.proxies.values():
            proxy.model.train()

    def forward_backward(self, batches: dict[int, Batch], keep_fn, desc: str) -> dict[int, tuple]:
        """{k: (per-sample losses, keep mask, step loss)}; an out-of-memory error or a non-finite loss
        becomes a message naming the step (the stage keeps the last complete round)."""
        (k, proxy), = self.proxies.items()
        b, cfg = batches[k], self.params.train
        try:
            losses, keep, loss = backward(proxy, b.xt, b.t, b.target, self.params,
                                          lambda l, sl: keep_fn(k, l, b.t[sl], b.positions[sl]))
        except torch.OutOfMemoryError:
            raise MemoryError(f"{desc}: out of memory at step {proxy.step + 1} (batch {cfg.batch_size}); lower "
                              "train.batch_size or raise train.grad_accum; the last complete round is kept and a "
                              "re-run resumes from it") from None
        if not finite(loss):
            raise diverged(desc, proxy.step + 1, loss.item())
        return {k: (losses, keep, loss)}

    def evidence(self, batches: dict[int, Batch], keep_fn, desc: str) -> dict[int, tuple]:
        """forward_backward's results from a forward pass without gradient: the draw only tells the
        mitigations its losses and keep mask (the authors' TAA queue)."""
        (k, proxy), = self.proxies.items()
        b = batches[k]
        with torch.no_grad():
            losses = sample_losses(prediction(proxy.model), b.xt, b.t, b.target, self.params.train.mixed_precision)
        keep, loss = kept_loss(losses, keep_fn(k, losses, b.t, b.positions))
        if not finite(loss):
            raise diverged(desc, proxy.step + 1, loss.item())
        return {k: (losses, keep, loss)}

    def update(self, grad_clip: float) -> None:
        for proxy in self.proxies.values():
            update(proxy, grad_clip)

    def current_weights(self) -> dict[int, dict[str, torch.Tensor]]:
        """Each proxy's current weights (a copy on the CPU): mid-round evaluation checkpoints."""
        return {k: cpu_copy(proxy.model.state_dict()) for k, proxy in self.proxies.items()}

    def finish(self) -> None:
        """Nothing to write back: the proxy trained in place."""


def cpu_copy(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: v.detach().to("cpu", copy=True) for name, v in state.items()}


def masked_loss(losses: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Mean over kept samples; skipped samples get zero weight, not a negated gradient.
    An all-skipped batch yields a zero loss that still lets the optimizer and EMA step."""
    return (losses * keep).sum() / keep.sum().clamp(min=1)


def kept_loss(losses: torch.Tensor, keep: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The keep mask (None from the mitigations: every sample) and the step's loss over it."""
    if keep is None:
        return torch.ones_like(losses, dtype=torch.bool), losses.mean()
    return keep, masked_loss(losses, keep)


AUTOCAST = {"fp16": torch.float16, "bf16": torch.bfloat16}


def autocast(device: torch.device, precision: str):
    return torch.autocast(device.type, dtype=AUTOCAST.get(precision, torch.float32), enabled=precision != "fp32")


def sample_losses(predict, xt, t, target, precision: str) -> torch.Tensor:
    """The denoising loss, per sample: mean((prediction - target)^2) over its channels and pixels,
    the prediction `predict(xt, t)` made under autocast. The one place the loss is computed: for one
    proxy (`predict` = `prediction(model)`), a stack of proxies (a vmapped forward, pipeline/train/stacked.py,
    samples on the second axis) and the loss table (pipeline/train/loss_table.py)."""
    with autocast(xt.device, precision):
        pred = predict(xt, t)
    return (pred.float() - target).pow(2).mean(dim=(-3, -2, -1))


def prediction(model: UNet2DModel):
    """A model's forward as sample_losses takes it."""
    return lambda xt, t: model(xt, t).sample


def backward(proxy: Proxy, xt, t, target, params: Params, keep_fn=lambda losses, sl: None):
    """Forward and backward of one optimizer step's batch, in train.grad_accum micro-batches
    (same gradient, less activation memory). `keep_fn(losses, sl)` is the mitigations' keep mask of
    the batch's slice `sl` (None: keep all). Returns per-sample losses, the keep mask and the step's loss: the mean over
    kept samples, as one full batch would give."""
    cfg, model = params.train, proxy.model

    def forward(sl):
        return sample_losses(prediction(model), xt[sl], t[sl], target[sl], cfg.mixed_precision)

    if cfg.grad_accum == 1:
        losses = forward(slice(None))
        keep, loss = kept_loss(losses, keep_fn(losses.detach(), slice(None)))
        if finite(loss):
            proxy.scaler.scale(loss).backward()
        return losses, keep, loss
    # The kept count of the whole batch is known only after the last micro-batch: back-propagate
    # the sums, then divide the gradients once.
    parts, keeps = [], []
    for idx in torch.arange(len(t)).tensor_split(cfg.grad_accum):
        sl = slice(int(idx[0]), int(idx[-1]) + 1)
        losses = forward(sl)
        keep, _ = kept_loss(losses, keep_fn(losses.detach(), sl))
        if finite(losses):
            proxy.scaler.scale((losses * keep).sum()).backward()
        parts.append(losses.detach())
        keeps.append(keep)
    losses, keep = torch.cat(parts), torch.cat(keeps)
    kept = keep.sum().clamp(min=1)
    for p in model.parameters():
        if p.grad is not None:
            p.grad.div_(kept.to(p.grad.device))
    return losses, keep, (losses * keep).sum() / kept
