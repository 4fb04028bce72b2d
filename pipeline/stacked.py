"""The proxies of one process trained at once (train.stack_proxies): one forward and backward for
all K per step instead of K after one another, for models too small to fill an accelerator.

Each parameter is stacked along a new leading proxy axis, and the UNet runs under
`torch.func.vmap(functional_call(...))` over that axis. Everything that makes a proxy a proxy stays
its own:
  - its batches, noise, timesteps and augmentation come from its own generator, in the order the
    one-after-another loop draws them;
  - its mitigations' hooks (AGC's bank, TAA's strengths) are called with its index;
  - its gradient is clipped by its own norm;
  - Adam runs on the stacked tensors, which is elementwise and so K independent Adams (one step
    count: every proxy takes the same steps);
  - its EMA and LR schedule step as in `training._optimizer_step`.
The stack is built from the Proxy objects at the start of a round and written back at its end,
so averaging, checkpoints, resume, MSR and the multi-process path see proxies as always. Results
equal the one-after-another loop's up to float rounding (batched kernels sum in another order):
tests/test_stacked.py states the tolerance.

GroupNorm: torch 2.13's group_norm kernel cannot run under vmap ("NYI: querying is_contiguous
inside of vmap"), so the stacked copy of the UNet uses `VmapGroupNorm`, the same formula
(Wu & He 2018) in plain tensor ops. Attention runs under vmap through torch's fallback (a loop
over proxies) where scaled_dot_product_attention has no batching rule (the CPU kernel has none).

Not stacked (params refuse `true`, `auto` falls back to one after another): DP-SGD (its Opacus
optimizer wraps each proxy), fp16 loss scaling (one GradScaler per proxy) and grad_accum > 1.
"""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call, vmap
from tqdm.auto import tqdm

from pipeline.config import Params
from pipeline.mitigation import Mitigations, Step
from pipeline.training import (AUTOCAST, LOG_EVERY, Proxy, RoundCounts, _batches, _CurveLog, _finite,
                               masked_loss)


def wanted(p: Params, device: torch.device, local_proxies: int) -> bool:
    """train.stack_proxies resolved: `auto` stacks on CUDA only, where small models leave the device
    idle; on a CPU one run of benchmarks/proxies_at_once.py --stacked gave 1.26x, not yet confirmed
    (docs/results.md)."""
    setting = p.train.stack_proxies
    if local_proxies < 2 or setting == "false":
        return False
    return setting == "true" or (device.type == "cuda" and p.stacking_refused() is None)


class VmapGroupNorm(nn.Module):
    """nn.GroupNorm's output from plain tensor ops, which vmap can batch; same parameter names."""

    def __init__(self, norm: nn.GroupNorm):
        super().__init__()
        self.num_groups, self.eps, self.affine = norm.num_groups, norm.eps, norm.affine
        self.weight, self.bias = norm.weight, norm.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grouped = x.reshape(x.shape[0], self.num_groups, -1)
        mean = grouped.mean(-1, keepdim=True)
        var = grouped.var(-1, unbiased=False, keepdim=True)
        y = ((grouped - mean) * torch.rsqrt(var + self.eps)).reshape(x.shape)
        if not self.affine:
            return y
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return y * self.weight.reshape(shape) + self.bias.reshape(shape)


def _vmappable(model: nn.Module) -> nn.Module:
    """A copy of the model whose GroupNorms vmap can batch (its own parameters are never used:
    functional_call passes the stacked ones in)."""
    out = copy.deepcopy(model)
    for parent in list(out.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.GroupNorm):
                setattr(parent, name, VmapGroupNorm(child))
    return out


@dataclass
class Stack:
    ks: list[int]                     # the proxies, in order along the stacked axis
    names: list[str]                  # parameter names, in model.parameters() order
    params: dict[str, torch.Tensor]   # name -> (K, ...) leaf
    optimizer: torch.optim.Adam
    module: nn.Module                 # the vmappable copy functional_call runs


def stack(proxies: dict[int, Proxy]) -> Stack:
    """The proxies' weights and Adam states stacked along a new leading axis."""
    ks = sorted(proxies)
    models = [dict(proxies[k].model.named_parameters()) for k in ks]
    names = list(models[0])
    params = {n: torch.stack([m[n].detach() for m in models]).requires_grad_() for n in names}
    optimizer = torch.optim.Adam([params[n] for n in names])
    # the proxies' settings (lr, betas, eps, ...), not what their LR schedule added (initial_lr)
    optimizer.param_groups[0].update({key: v for key, v in proxies[ks[0]].optimizer.param_groups[0].items()
                                      if key in optimizer.defaults})
    states = [proxies[k].optimizer.state_dict()["state"] for k in ks]
    for i, n in enumerate(names):
        if i in states[0]:
            optimizer.state[params[n]] = {"step": states[0][i]["step"].clone(),
                                          **{key: torch.stack([s[i][key] for s in states])
                                             for key in ("exp_avg", "exp_avg_sq")}}
    return Stack(ks, names, params, optimizer, _vmappable(proxies[ks[0]].model))


def unstack(s: Stack, proxies: dict[int, Proxy]) -> None:
    """Write the stacked weights and Adam states back into each proxy."""
    for j, k in enumerate(s.ks):
        own = dict(proxies[k].model.named_parameters())
        with torch.no_grad():
            for n in s.names:
                own[n].copy_(s.params[n][j])
        for n in s.names:
            state = s.optimizer.state.get(s.params[n])
            if state:
                proxies[k].optimizer.state[own[n]] = {"step": state["step"].clone(), "exp_avg": state["exp_avg"][j].clone(),
                                                      "exp_avg_sq": state["exp_avg_sq"][j].clone()}


def train_steps(s: Stack, proxies: dict[int, Proxy], images: torch.Tensor, shards: dict[int, torch.Tensor],
                steps: int, noise_schedule, params: Params, mitigations: Mitigations, counts: RoundCounts,
                desc: str = "train", on_curve=None) -> None:
    """training.train_steps for every stacked proxy at once: each step draws every proxy's batch
    from its shard and generator, runs one batched forward and backward, and steps each proxy;
    `on_curve(k, row)` receives proxy k's curve point every LOG_EVERY steps."""
    cfg = params.train
    batches = {k: _batches(shards[k], cfg.batch_size, proxies[k].generator) for k in s.ks}
    logs = {k: _CurveLog(proxies[k].generator.device) for k in s.ks}
    s.module.train()
    bar = tqdm(range(steps), desc=desc, unit="step", mininterval=1, leave=False)
    for i in bar:
        drawn = [_draw(proxies[k], k, next(batches[k]), images, noise_schedule, mitigations) for k in s.ks]
        losses = _forward(s, drawn, cfg.mixed_precision)
        keeps, step_losses = _backward(s, drawn, losses, mitigations, desc)
        _clip_each(s, cfg.grad_clip)
        _step_each(s, proxies)
        for j, k in enumerate(s.ks):
            pos, _, t, _ = drawn[j]
            mitigations.observe(k, Step(pos, t, losses[j].detach(), keeps[j]))
            counts.add(pos, keeps[j])
            logs[k].add(step_losses[j], keeps[j], proxies[k].step)
            if logs[k].n == LOG_EVERY or i == steps - 1:
                row = {"step": proxies[k].step, **logs[k].read(desc), **mitigations.curve(k)}
                bar.set_postfix(loss=f"{row['loss']:.4f}", kept=f"{row['kept']:.2f}")
                if on_curve:
                    on_curve(k, row)
    bar.close()


def _draw(proxy: Proxy, k: int, pos: torch.Tensor, images: torch.Tensor, noise_schedule, mitigations: Mitigations):
    """Proxy k's step input, drawn from its generator in training.train_steps' order: (positions,
    noisy images, timesteps, noise)."""
    gen = proxy.generator
    x0 = mitigations.transform(k, images[pos], pos, gen)
    noise = torch.randn(x0.shape, generator=gen, device=gen.device)
    t = torch.randint(0, noise_schedule.config.num_train_timesteps, (x0.shape[0],), generator=gen, device=gen.device)
    return pos, noise_schedule.add_noise(x0, noise, t), t, noise


def _forward(s: Stack, drawn: list, precision: str) -> torch.Tensor:
    """Per-sample losses of every proxy, (K, batch): one vmapped UNet forward."""
    xt, t, noise = (torch.stack([d[i] for d in drawn]) for i in (1, 2, 3))
    device = xt.device
    amp = torch.autocast(device.type, dtype=AUTOCAST.get(precision, torch.float32), enabled=precision != "fp32")

    def one(params, x, timesteps):
        return functional_call(s.module, params, (x, timesteps)).sample

    with amp:
        pred = vmap(one, randomness="different")(s.params, xt, t)  # different: each proxy its own dropout
    return (pred.float() - noise).pow(2).mean(dim=(2, 3, 4))


def _backward(s: Stack, drawn: list, losses: torch.Tensor, mitigations: Mitigations, desc: str):
    """Each proxy's loss (the mean over its kept samples, training._backward's) and one backward of
    their sum: proxy k's parameters get exactly its own loss's gradient."""
    keeps, step_losses = [], []
    for j, k in enumerate(s.ks):
        keep = mitigations.keep(k, losses[j].detach(), drawn[j][2])
        if keep is None:
            keeps.append(torch.ones_like(losses[j], dtype=torch.bool))
            step_losses.append(losses[j].mean())
        else:
            keeps.append(keep)
            step_losses.append(masked_loss(losses[j], keep))
    total = torch.stack(step_losses).sum()
    if not _finite(total):
        raise FloatingPointError(f"{desc}: loss is not finite; the last complete round is kept (a re-run resumes "
                                 "from it): lower train.lr, or use fp32")
    total.backward()
    return keeps, [x.detach() for x in step_losses]


def _clip_each(s: Stack, max_norm: float) -> None:
    """torch.nn.utils.clip_grad_norm_ per proxy: each proxy's gradient scaled by its own total norm."""
    grads = [s.params[n].grad for n in s.names if s.params[n].grad is not None]
    norms = torch.stack([g.flatten(1).norm(dim=1) for g in grads], dim=1).norm(dim=1)
    coef = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(coef.view(-1, *[1] * (g.dim() - 1)))


def _step_each(s: Stack, proxies: dict[int, Proxy]) -> None:
    """training._optimizer_step for every proxy: one Adam step on the stack at the proxies' common
    learning rate, then each proxy's schedule, EMA and step count."""
    lr = proxies[s.ks[0]].optimizer.param_groups[0]["lr"]  # every proxy's schedule is at the same step
    for group in s.optimizer.param_groups:
        group["lr"] = lr
    s.optimizer.step()
    s.optimizer.zero_grad(set_to_none=True)
    # views that require grad, so that EMAModel blends them (it copies parameters that do not)
    per_proxy = list(zip(*(s.params[n].unbind(0) for n in s.names)))
    for j, k in enumerate(s.ks):
        proxy = proxies[k]
        with warnings.catch_warnings():  # the schedule's own optimizer does not step here: the stack's did
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)` before")
            proxy.lr_schedule.step()
        proxy.ema.step(per_proxy[j])
        proxy.step += 1
