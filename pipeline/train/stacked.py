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
  - its EMA and LR schedule step as in `training.update`.
The step itself is training.train_steps', the same for one proxy and for a stack; only the forward,
backward and update differ. The stack is built from the Proxy objects at the start of a round and
written back at its end, so averaging, checkpoints, resume, MSR and the multi-process path see
proxies as always. Results
equal the one-after-another loop's up to float rounding (batched kernels sum in another order):
tests/test_stacked.py states the tolerance.

GroupNorm: torch 2.13's group_norm kernel cannot run under vmap ("NYI: querying is_contiguous
inside of vmap"), so the stacked copy of the UNet uses `VmapGroupNorm`, the same formula
(Wu & He 2018) in plain tensor ops. Attention runs under vmap through torch's fallback (a loop
over proxies) where scaled_dot_product_attention has no batching rule (the CPU kernel has none).

Not stacked (params refuse `true`, `auto` falls back to one after another): DP-SGD (its Opacus
optimizer wraps each proxy), fp16 loss scaling (one GradScaler per proxy), grad_accum > 1 and the
authors' TAA queue (taa.mode: queue: each proxy steps when its own queue fills).
"""
from __future__ import annotations

import copy

import torch
from torch import nn
from torch.func import functional_call, vmap

from pipeline.core.config import Params
from pipeline.train.training import Batch, Proxy, advance, cpu_copy, diverged, finite, kept_loss, sample_losses


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


class Stacked:
    """The proxies of one process as one group for training.train_steps: their weights and Adam
    states stacked along a new leading axis when it is built (at a round's start), one vmapped
    forward and backward a step, and written back into each proxy by `finish` (at the round's end)."""

    def __init__(self, proxies: dict[int, Proxy], params: Params):
        self.proxies, self.params = dict(sorted(proxies.items())), params
        models = [dict(proxy.model.named_parameters()) for proxy in self.proxies.values()]
        self.names = list(models[0])  # in model.parameters() order
        self.weights = {n: torch.stack([m[n].detach() for m in models]).requires_grad_() for n in self.names}
        self.optimizer = _stacked_adam(list(self.proxies.values()), self.names, self.weights)
        self.module = _vmappable(next(iter(self.proxies.values())).model)  # the module functional_call runs

    def train(self) -> None:
        self.module.train()

    def forward_backward(self, batches: dict[int, Batch], keep_fn, desc: str) -> dict[int, tuple]:
        """{k: (per-sample losses, keep mask, step loss)}, each proxy's loss the mean over its kept
        samples (training.backward's); one backward of their sum: proxy k's weights get exactly its
        own loss's gradient."""
        xt, t, target = (torch.stack([getattr(batches[k], name) for k in self.proxies]) for name in ("xt", "t", "target"))

        def one(weights, x, timesteps):
            return functional_call(self.module, weights, (x, timesteps)).sample

        def predict(x, timesteps):  # randomness="different": each proxy its own dropout
            return vmap(one, randomness="different")(self.weights, x, timesteps)

        losses = sample_losses(predict, xt, t, target, self.params.train.mixed_precision)
        results = {}
        for j, k in enumerate(self.proxies):
            keep, loss = kept_loss(losses[j], keep_fn(k, losses[j].detach(), t[j], batches[k].positions))
            results[k] = (losses[j].detach(), keep, loss)
        total = torch.stack([loss for _, _, loss in results.values()]).sum()
        if not finite(total):
            raise diverged(desc, next(iter(self.proxies.values())).step + 1, total.item())
        total.backward()
        return {k: (losses_, keep, loss.detach()) for k, (losses_, keep, loss) in results.items()}

    def update(self, grad_clip: float) -> None:
        """training.update for every proxy: each gradient clipped by its own norm, one Adam step on
        the stack at the proxies' common learning rate, then each proxy's schedule, EMA and step count."""
        _clip_each([self.weights[n].grad for n in self.names], grad_clip)
        lr = next(iter(self.proxies.values())).optimizer.param_groups[0]["lr"]  # every schedule is at the same step
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        # views that require grad, so that EMAModel blends them (it copies parameters that do not)
        per_proxy = list(zip(*(self.weights[n].unbind(0) for n in self.names)))
        for j, proxy in enumerate(self.proxies.values()):
            advance(proxy, per_proxy[j])

    def current_weights(self) -> dict[int, dict[str, torch.Tensor]]:
        """Each proxy's current weights (a copy on the CPU), read from the stack: mid-round
        evaluation checkpoints, without writing anything back."""
        out = {}
        for j, (k, proxy) in enumerate(self.proxies.items()):
            state = proxy.model.state_dict()
            state.update({n: self.weights[n][j] for n in self.names})
            out[k] = cpu_copy(state)
        return out

    def finish(self) -> None:
        """Write the stacked weights and Adam states back into each proxy."""
        for j, proxy in enumerate(self.proxies.values()):
            own = dict(proxy.model.named_parameters())
            with torch.no_grad():
                for n in self.names:
                    own[n].copy_(self.weights[n][j])
            for n in self.names:
                state = self.optimizer.state.get(self.weights[n])
                if state:
                    proxy.optimizer.state[own[n]] = {"step": state["step"].clone(), "exp_avg": state["exp_avg"][j].clone(),
                                                     "exp_avg_sq": state["exp_avg_sq"][j].clone()}


def _stacked_adam(proxies: list[Proxy], names: list[str], weights: dict[str, torch.Tensor]) -> torch.optim.Adam:
    """One Adam over the stacked weights, with the proxies' settings and moments (Adam is elementwise,
    so this is K independent Adams with one step count: every proxy takes the same steps)."""
    optimizer = torch.optim.Adam([weights[n] for n in names])
    # the proxies' settings (lr, betas, eps, ...), not what their LR schedule added (initial_lr)
    optimizer.param_groups[0].update({key: v for key, v in proxies[0].optimizer.param_groups[0].items()
                                      if key in optimizer.defaults})
    states = [proxy.optimizer.state_dict()["state"] for proxy in proxies]
    for i, n in enumerate(names):
        if i in states[0]:
            optimizer.state[weights[n]] = {"step": states[0][i]["step"].clone(),
                                           **{key: torch.stack([s[i][key] for s in states])
                                              for key in ("exp_avg", "exp_avg_sq")}}
    return optimizer


def _clip_each(grads: list[torch.Tensor | None], max_norm: float) -> None:
    """torch.nn.utils.clip_grad_norm_ per proxy: each proxy's gradient scaled by its own total norm."""
    grads = [g for g in grads if g is not None]
    norms = torch.stack([g.flatten(1).norm(dim=1) for g in grads], dim=1).norm(dim=1)
    coef = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(coef.view(-1, *[1] * (g.dim() - 1)))
