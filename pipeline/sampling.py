"""Sampling from a trained UNet. A sampler is a plain function with the signature of `sample`
(k-diffusion's convention), so adding one touches this file only."""
from __future__ import annotations

import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel


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
