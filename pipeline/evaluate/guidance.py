"""Anti-memorization guidance at sampling time, the unconditional part of AMG (Chen, Liu, Xu,
"Towards Memorization-Free Diffusion Models", CVPR 2024, arXiv 2404.00922): no retraining.

At every DDIM step the model's clean estimate x0_hat = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t) is
compared with its nearest training image by the paper's unconditional measure, the normalized L2
distance: the L2 distance to the nearest training image over half the mean L2 distance to the
NL2_NEIGHBOURS nearest (a copy below NL2_COPY).  Where it is below a threshold that moves over the
steps (the paper's parabolic schedule in a_t), dissimilarity guidance adds to eps the gradient
through x_t of the similarity (the negative normalized L2), as classifier guidance adds a
classifier's, so that the step's x0_hat moves away from that image; its weight is `amg.scale`
times how far past the threshold the estimate is.  Elsewhere the step is plain DDIM, bit for bit.

`sample` has the signature of pipeline.evaluate.sampling.sample (k-diffusion's convention: every sampler a
plain function) plus the training images to stay away from and the amg settings.  The reference
should be de-duplicated (one image per group of duplicates): a duplicated image would otherwise
be its own second neighbour and shrink the mean the distance is normalized by.
"""
from __future__ import annotations

import torch
from diffusers import DDPMScheduler, UNet2DModel
from torch import Tensor

from pipeline.core import metrics

from pipeline.evaluate import sampling
from pipeline.core.config import AMGConfig

NL2_NEIGHBOURS = 50  # the paper's n: the mean distance is over the 50 nearest training images
NL2_HALF = 0.5       # the paper's alpha: the distance is normalized by half that mean
NL2_COPY = 1.4       # the paper's copy threshold (CIFAR-10): a sample below it copies an image
_TINY = 1e-12


def sample(unet: UNet2DModel, scheduler: DDPMScheduler, n: int, steps: int, seed: int,
           batch_size: int = 256, progress: bool = True, desc: str = "sampling (AMG)", *,
           reference: Tensor, amg: AMGConfig) -> Tensor:
    """DDIM, eta 0, with dissimilarity guidance away from `reference` (training images in [-1, 1],
    de-duplicated). The same noise as pipeline.evaluate.sampling.sample for the same seed, so with the
    guidance never active the images are identical. Returns images in [-1, 1] on the CPU."""
    reference = reference.to(next(unet.parameters()).device)
    return sampling.ddim_loop(unet, scheduler, n, steps, seed, batch_size, progress, desc,
                              lambda x, t, alpha_bar: guided_eps(unet, x, t, alpha_bar, reference, amg)[0])


def threshold(amg: AMGConfig, alpha_bar: Tensor) -> Tensor:
    """The normalized-L2 threshold at a step of cumulative signal a_t: the paper's parabolic
    schedule lambda_t = lambda_min + (lambda_max - lambda_min) a_t^2 on its similarity (the
    negative distance), written in distance units: threshold_start at pure noise (a_t = 0),
    threshold_end at the clean image (a_t = 1)."""
    return amg.threshold_start + (amg.threshold_end - amg.threshold_start) * alpha_bar ** 2


def guided_eps(unet: UNet2DModel, x: Tensor, t, alpha_bar: Tensor, reference: Tensor,
               amg: AMGConfig) -> tuple[Tensor, Tensor]:
    """(the noise estimate to step with, which samples were guided [B] bool) at one step.

    Detection runs without autograd, as plain DDIM's forward pass (so an unguided sample's estimate
    is the very same tensor); only the guided samples' UNet pass is run again, with autograd, for
    the gradient: a step where nothing is near a training image costs one neighbour query more."""
    with torch.no_grad():
        eps = unet(x, t).sample
        x0_hat = _x0_hat(x, eps, alpha_bar)
        _, idx = metrics.nearest_neighbors(x0_hat, reference, NL2_NEIGHBOURS)
        nl2 = _normalized_l2(_distances(x0_hat, reference, idx))
        excess = (threshold(amg, alpha_bar) - nl2).clamp_(min=0)
    active = excess > 0
    if not bool(active.any()):
        return eps, active
    x_active = x[active].detach().requires_grad_(True)
    with torch.enable_grad():
        x0_active = _x0_hat(x_active, unet(x_active, t).sample, alpha_bar)
        # d(sim_i)/dx_t for every guided sample at once, sim = -nl2: the sum separates, as samples
        # meet only through it (GroupNorm and attention act within one image)
        (grad,) = torch.autograd.grad(-_normalized_l2(_distances(x0_active, reference, idx[active])).sum(), x_active)
    out = eps.clone()
    out[active] += amg.scale * excess[active].view(-1, 1, 1, 1) * (1 - alpha_bar).sqrt() * _unit_rms(grad)
    return out, active


def _x0_hat(x: Tensor, eps: Tensor, alpha_bar: Tensor) -> Tensor:
    """The clean image the noise estimate implies (DDPM's x0 parameterization)."""
    return (x - (1 - alpha_bar).sqrt() * eps) / alpha_bar.sqrt()


def _unit_rms(grad: Tensor) -> Tensor:
    """Each sample's gradient rescaled to a root-mean-square of one per value (a zero one stays
    zero). The gradient of a normalized distance shrinks as 1/values with the image's size, so a
    raw `amg.scale` would not carry over between resolutions; rescaled, scale x excess is the
    shift of the noise estimate in its own units (about one per value)."""
    norm = grad.flatten(1).pow(2).mean(1).sqrt()
    return grad / norm.clamp(min=torch.finfo(grad.dtype).tiny).view(-1, 1, 1, 1)


def _distances(x: Tensor, reference: Tensor, idx: Tensor) -> Tensor:
    """L2 distances [B, k] of each image to its k given reference images (differentiable in x)."""
    neighbours = reference.flatten(1)[idx]  # [B, k, D]
    # + tiny: at an exact copy the direction is undefined; sqrt's gradient there would be NaN
    return ((x.flatten(1).unsqueeze(1) - neighbours).pow(2).sum(2) + _TINY).sqrt()


def _normalized_l2(dists: Tensor) -> Tensor:
    """The paper's normalized L2 from ascending distances [B, k]: the first over NL2_HALF x their mean."""
    return dists[:, 0] / (NL2_HALF * dists.mean(1))


def normalized_l2_scores(images: Tensor, reference: Tensor) -> Tensor:
    """Each image's normalized L2 to `reference` (the paper's memorization measure; images and
    reference in the same range, the reference de-duplicated), on the CPU, float64."""
    sq, _ = metrics.nearest_neighbors(images, reference, NL2_NEIGHBOURS)
    return _normalized_l2(sq.double().sqrt()).cpu()


# metric keys (pipeline/evaluate/metric_names.py lists them with their labels)
NL2_COPY_SHARE = "nl2_copy_share"
NL2_P5 = "nl2_p5"
NL2_MIN = "nl2_min"


def nl2_summary(nl2: Tensor, prefix: str = "") -> dict[str, float]:
    """The paper's figure and its tail: the share of images below NL2_COPY, and the 5th percentile
    and minimum of the normalized L2 (its similarity's 95th percentile and maximum: a distance's
    tail toward copies is its low end), keys prefixed with `prefix`."""
    values = nl2.double()
    return {prefix + NL2_COPY_SHARE: float((values < NL2_COPY).double().mean()),
            prefix + NL2_P5: float(values.quantile(0.05)),
            prefix + NL2_MIN: float(values.min())}

