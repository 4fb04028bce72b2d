"""Membership inference against a trained diffusion model: does it tell its training images
(members) from held-out ones (non-members)? docs/method.md#membership-inference.

Two white-box attacks, each giving a score per image where higher means "more likely a member":
- loss attack (Matsumoto et al. 2023, "Membership Inference Attacks against Diffusion Models";
  Hu & Pang 2023, "Membership Inference of Diffusion Models"): minus the denoising loss, averaged
  over a fixed, seeded set of (t, noise) pairs shared by every image;
- PIA (Kong et al., ICLR 2024, "An Efficient Membership Inference Attack for the Diffusion Model by
  Proximal Initialization"): the model's own noise estimate at t = 0 is used as the noise.
Reported as ROC AUC (0.5 = no leakage) with a bootstrap interval, and TPR at 1% FPR (Carlini et al.
2022, "Membership Inference Attacks From First Principles": the low-FPR regime is what matters).
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import scipy.stats
import torch
from diffusers import DDPMScheduler, UNet2DModel

from pipeline.core.seeds import MIA_PAIR, derived_seed

MIA_MEMBERS = "mia_members"  # the other keys are "<attack>_auc", ... (_attack_metrics)

PIA_T_FRACTION = 0.2  # PIA's timestep as a fraction of T: t = 200 of 1000, the paper's DDPM setting
PIA_NORM = 4          # the official code's distance: sum of |difference|^4, i.e. an l4 norm


def roc_auc(member_scores, nonmember_scores) -> float:
    """P(member score > non-member score) + P(tie) / 2: the Mann-Whitney form of the ROC AUC
    (Hanley & McNeil 1982), the same number as sklearn's roc_auc_score with members as positives,
    and fast enough to bootstrap. NaN when either set is empty."""
    m = np.asarray(member_scores, np.float64).ravel()
    n = np.asarray(nonmember_scores, np.float64).ravel()
    if not len(m) or not len(n):
        return math.nan
    ranks = scipy.stats.rankdata(np.concatenate([m, n]))  # ties get their mean rank
    return float((ranks[:len(m)].sum() - len(m) * (len(m) + 1) / 2) / (len(m) * len(n)))


def tpr_at_fpr(members, nonmembers, fpr: float = 0.01) -> float:
    """The highest true-positive rate of a threshold on the score whose false-positive rate is at
    most `fpr` (the ROC point of Carlini et al. 2022). With n non-members only floor(fpr * n) may
    score above the threshold: at n = 256 and 1% that is 2 images, so the figure is coarse."""
    m = np.asarray(members, np.float64).ravel()
    n = np.sort(np.asarray(nonmembers, np.float64).ravel())[::-1]
    allowed = math.floor(fpr * len(n) + 1e-9)  # 1e-9: 0.01 * 300 must allow 3, not 2.9999
    if allowed >= len(n):
        return 1.0
    # Any threshold letting through at most `allowed` non-members lies above the (allowed+1)-th
    # largest non-member score, so "strictly above it" is the most permissive such threshold.
    return float(np.mean(m > n[allowed]))


def bootstrap_interval(members, nonmembers, stat: Callable, n: int = 1000, seed: int = 0,
                       level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap (Efron & Tibshirani 1993) of stat(members, nonmembers), each set
    resampled with replacement on its own (the two are independent samples)."""
    m, nm = np.asarray(members, np.float64), np.asarray(nonmembers, np.float64)
    rng = np.random.default_rng(seed)
    values = np.array([stat(m[rng.integers(0, len(m), len(m))], nm[rng.integers(0, len(nm), len(nm))])
                       for _ in range(n)])
    tail = (1.0 - level) / 2.0
    low, high = np.nanquantile(values, [tail, 1.0 - tail])
    return float(low), float(high)


def balanced(members, nonmembers, seed: int):
    """Both sets cut to the smaller count: the larger one by a seeded draw without replacement,
    kept in its original order. Works on numpy arrays and torch tensors (indexes the first axis)."""
    k = min(len(members), len(nonmembers))
    rng = np.random.default_rng(seed)

    def cut(x):
        if len(x) == k:
            return x
        keep = np.sort(rng.choice(len(x), k, replace=False))
        return x[torch.from_numpy(keep)] if isinstance(x, torch.Tensor) else x[keep]
    return cut(members), cut(nonmembers)


def _pair_draw(seed: int, pair: int, shape: tuple[int, ...], timesteps: int) -> tuple[int, torch.Tensor]:
    """Draw `pair` of the loss attack: depends only on (seed, pair), never on the image, so members
    and non-members are scored at the very same (t, noise) and differ only in the image."""
    gen = torch.Generator().manual_seed(derived_seed(seed, MIA_PAIR, pair))
    t = int(torch.randint(0, timesteps, (1,), generator=gen))
    return t, torch.randn(shape, generator=gen)


def _predict(unet: UNet2DModel, x: torch.Tensor, t: int, batch_size: int) -> torch.Tensor:
    """eps_theta(x, t) for every row of x, in batches, returned on the CPU."""
    device = next(unet.parameters()).device
    out = []
    for s in range(0, len(x), batch_size):
        batch = x[s:s + batch_size].to(device)
        out.append(unet(batch, torch.full((len(batch),), t, device=device)).sample.float().cpu())
    return torch.cat(out)


@torch.inference_mode()
def loss_scores(unet: UNet2DModel, scheduler: DDPMScheduler, images: torch.Tensor, pairs: int = 8,
                seed: int = 0, batch_size: int = 256) -> np.ndarray:
    """Membership score of the loss attack (Matsumoto et al. 2023; Hu & Pang 2023): minus the
    denoising MSE ||eps_theta(sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, t) - eps||^2 / D (Ho et al.
    2020, Eq. 14) averaged over `pairs` (t, eps) draws. Draw p depends only on (seed, p) and is the
    same for every image, so an image's score does not depend on which other images are scored.
    images: [N, C, H, W] in [-1, 1]. Costs pairs * N forward passes."""
    was_training = unet.training
    unet.eval()
    total = torch.zeros(len(images), dtype=torch.float64)
    for p in range(pairs):
        t, noise = _pair_draw(seed, p, tuple(images.shape[1:]), scheduler.config.num_train_timesteps)
        noise = noise.expand_as(images)
        x_t = scheduler.add_noise(images.cpu(), noise, torch.full((len(images),), t))
        total += (_predict(unet, x_t, t, batch_size) - noise).pow(2).mean(dim=(1, 2, 3)).double()
    unet.train(was_training)
    return -(total / pairs).numpy()


def pia_timestep(scheduler: DDPMScheduler) -> int:
    """PIA's attack timestep: t = 200 of T = 1000, the DDPM setting cited for Kong et al. (their
    official code prints the AUC at t = 10, 20, ..., 300 and leaves the choice open), scaled to
    this schedule's T."""
    return max(1, round(PIA_T_FRACTION * scheduler.config.num_train_timesteps))


@torch.inference_mode()
def pia_scores(unet: UNet2DModel, scheduler: DDPMScheduler, images: torch.Tensor, t: int | None = None,
               batch_size: int = 256) -> np.ndarray:
    """Membership score of PIA (Kong et al., ICLR 2024): eps0 = eps_theta(x0, 0) is taken as the
    noise, x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps0, and the score is minus
    ||eps_theta(x_t, t) - eps0||_4. A member's trajectory is one the model has fitted, so its
    prediction at t returns to the noise it started from. The l4 norm is the official code's
    (`lp=4`, which sums |d|^4: the same ranking); it weighs the few large deviations more than l2.
    No randomness. images: [N, C, H, W] in [-1, 1]; costs 2 N forward passes.

    The premise needs eps_theta(x0, 0) to be fitted well. On the 8-image toy model of
    tests/test_privacy.py (300 to 6000 steps) PIA ranks members *below* non-members (AUC 0.0 to
    0.4 for t = 10 to 300) while the loss attack scores 1.0: an AUC far below 0.5 is leakage too."""
    t = pia_timestep(scheduler) if t is None else int(t)
    was_training = unet.training
    unet.eval()
    x0 = images.cpu().float()
    eps0 = _predict(unet, x0, 0, batch_size)
    x_t = scheduler.add_noise(x0, eps0, torch.full((len(x0),), t))
    dist = (_predict(unet, x_t, t, batch_size) - eps0).abs().pow(PIA_NORM).flatten(1).sum(1)
    unet.train(was_training)
    return -dist.double().pow(1.0 / PIA_NORM).numpy()


def _attack_metrics(prefix: str, members: np.ndarray, nonmembers: np.ndarray, bootstrap: int,
                    seed: int) -> dict[str, float]:
    low, high = bootstrap_interval(members, nonmembers, roc_auc, n=bootstrap, seed=seed)
    return {f"{prefix}_auc": roc_auc(members, nonmembers), f"{prefix}_auc_low": low,
            f"{prefix}_auc_high": high, f"{prefix}_tpr_at_1fpr": tpr_at_fpr(members, nonmembers, 0.01)}


def membership_inference(unet: UNet2DModel, scheduler: DDPMScheduler, members: torch.Tensor,
                         nonmembers: torch.Tensor, seed: int = 0, pairs: int = 8, pia_t: int | None = None,
                         bootstrap: int = 1000, batch_size: int = 256) -> dict[str, float]:
    """Both attacks on equal numbers of members and non-members (the larger set is subsampled,
    seeded), images in [-1, 1]. 'mia_*' is the loss attack, 'pia_*' PIA: ROC AUC, its 95%
    bootstrap interval, TPR at 1% FPR; 'mia_members' the count used per side.
    Costs (pairs + 2) forward passes per image."""
    members, nonmembers = balanced(members, nonmembers, seed)
    both = torch.cat([members, nonmembers])
    k = len(members)
    loss = loss_scores(unet, scheduler, both, pairs=pairs, seed=seed, batch_size=batch_size)
    pia = pia_scores(unet, scheduler, both, t=pia_t, batch_size=batch_size)
    out = _attack_metrics("mia", loss[:k], loss[k:], bootstrap, seed)
    out.update(_attack_metrics("pia", pia[:k], pia[k:], bootstrap, seed))
    out[MIA_MEMBERS] = k
    return out
