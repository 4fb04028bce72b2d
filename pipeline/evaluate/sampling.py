"""Sampling from a trained UNet. A sampler is a plain function with the signature of `sample`
(k-diffusion's convention), so adding one touches this file only."""
from __future__ import annotations

import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel


@torch.no_grad()
def sample(unet: UNet2DModel, scheduler: DDPMScheduler, n: int, steps: int, seed: int,
           batch_size: int = 256, progress: bool = True, desc: str = "sampling") -> torch.Tensor:
    """DDIM, eta 0, as the official evaluation. Returns images in [-1, 1] on the CPU."""
    return ddim_loop(unet, scheduler, n, steps, seed, batch_size, progress, desc,
                     lambda x, t, alpha_bar: unet(x, t).sample)


def ddim_loop(unet: UNet2DModel, scheduler: DDPMScheduler, n: int, steps: int, seed: int, batch_size: int,
              progress: bool, desc: str, eps_fn) -> torch.Tensor:
    """The DDIM loop (eta 0) every sampler shares: the same noise for the same seed, and the noise
    estimate from eps_fn(x_t, t, alpha_bar_t), which may use autograd (guidance); the step itself
    is taken without it. Returns images in [-1, 1] on the CPU."""
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
                eps = eps_fn(x, t, ddim.alphas_cumprod[t].to(device))
                with torch.no_grad():
                    x = ddim.step(eps, t, x, eta=0.0).prev_sample
                bar.update(x.shape[0])
            out.append(x.clamp(-1, 1).cpu())
    return torch.cat(out)
