"""A round's loss table: every training sample's denoising loss under each proxy's end-of-round
weights, at fixed seeded (t, noise) draws, which memory-sample redistribution (MSR) reads."""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from pipeline.core.seeds import PROFILE_DRAWS, derived_seed
from pipeline.train.training import prediction, sample_losses

if TYPE_CHECKING:  # pipeline/core/models.py says why not at run time
    from diffusers import DDPMScheduler, UNet2DModel


class LossTable:
    """The round's loss table, losses[i, k] = loss of sample i under proxy k's end-of-round weights
    (NaN where not scored), filled as needed. Every sample is scored under its own proxy; under the
    other proxies only the rows redistribution reads (msr.profile: candidates), or every sample
    (msr.profile: all, K times the cost). A forward without gradients costs about a third of a
    training step, so a pair costs about (1 + rows read x (K-1) / N) / 3 local epochs.
    Each rank scores under its own proxies; the columns are then shared, so every rank holds the
    same table and makes the same (collective) calls. A loss is of the objective training uses
    (`mitigations.noised`: ambient training's target above its timestep), on the clean image (no
    augmentation: the table asks what a proxy has learnt of the image itself)."""

    def __init__(self, proxies: dict, images: torch.Tensor, noise_schedule: DDPMScheduler, ranks, shards: int,
                 pairs: int, seed: int, mitigations=None):
        self.proxies, self.images, self.noise_schedule, self.ranks = proxies, images, noise_schedule, ranks
        self.pairs, self.seed, self.mitigations = pairs, seed, mitigations
        self.losses = np.full((len(images), shards), np.nan)

    def score(self, wanted: np.ndarray) -> None:
        """Score the NaN cells of losses where `wanted` (n x K) is true."""
        todo = wanted & np.isnan(self.losses)
        for k, proxy in self.proxies.items():
            positions = np.flatnonzero(todo[:, k])
            if len(positions):
                self.losses[positions, k] = profile_losses(
                    proxy.model, self.images, positions, self.noise_schedule, self.pairs, self.seed,
                    objective=self._objective(k)).numpy()
        for k in range(self.losses.shape[1]):
            self.losses[:, k] = self.ranks.share_column(self.losses[:, k], self.ranks.owner(k))

    def _objective(self, k: int):
        if self.mitigations is None:
            return None
        return lambda x0, positions, t, noise: self.mitigations.noised(k, x0, positions, t, noise, self.noise_schedule)

    def rows(self, positions: np.ndarray) -> np.ndarray:
        """redistribute's score function: the rows of `positions` under every proxy."""
        wanted = np.zeros(self.losses.shape, dtype=bool)
        wanted[positions] = True
        self.score(wanted)
        return self.losses[positions]


PROFILE_CHUNK = 256  # positions whose draws come from one generator: fixed, so a draw never depends on N


def _draws(seed: int, chunk: int, pairs: int, shape: tuple[int, ...], timesteps: int):
    gen = torch.Generator().manual_seed(derived_seed(seed, PROFILE_DRAWS, chunk))
    t = torch.randint(0, timesteps, (pairs, PROFILE_CHUNK), generator=gen)
    return t, torch.randn((pairs, PROFILE_CHUNK, *shape), generator=gen)


@torch.inference_mode()
def profile_losses(model: UNet2DModel, images: torch.Tensor, positions: np.ndarray,
                   noise_schedule: DDPMScheduler, pairs: int, seed: int, batch_size: int = 512,
                   objective=None) -> torch.Tensor:
    """Mean denoising loss of images[positions] at `pairs` (t, noise) draws. A sample's draws depend
    only on (seed, its position), so every proxy scores it at the same draws whichever subset of the
    training set that proxy is asked to score: the losses are comparable across proxies.
    `objective(x0, positions, t, noise) -> (x_t, target)`: training's, where a mitigation sets it;
    None: the plain DDPM one (x_t from add_noise, the noise as target)."""
    model.eval()
    device = next(model.parameters()).device
    positions = np.asarray(positions, dtype=np.int64)
    out = torch.zeros(len(positions))
    for chunk in np.unique(positions // PROFILE_CHUNK):
        where = np.flatnonzero(positions // PROFILE_CHUNK == chunk)
        rows = torch.from_numpy(positions[where] % PROFILE_CHUNK)
        t_all, noise_all = _draws(seed, int(chunk), pairs, tuple(images.shape[1:]),
                                  noise_schedule.config.num_train_timesteps)
        # every (pair, sample) in one flat batch: big no-grad batches are the cheap way on a CPU
        # the draws are made on the CPU (the same on every device), then everything goes to the model
        flat = torch.from_numpy(positions[where]).to(images.device).repeat(pairs)
        x0 = images[flat].to(device)
        t = t_all[:, rows].reshape(-1).to(device)
        noise = noise_all[:, rows].reshape(-1, *images.shape[1:]).to(device)
        losses = torch.empty(len(t), device=device)
        for s in range(0, len(t), batch_size):
            sl = slice(s, s + batch_size)
            if objective is None:
                xt, target = noise_schedule.add_noise(x0[sl], noise[sl], t[sl]), noise[sl]
            else:
                xt, target = objective(x0[sl], flat[sl], t[sl], noise[sl])
            losses[sl] = sample_losses(prediction(model), xt, t[sl], target, "fp32")
        losses = losses.cpu()
        out[torch.from_numpy(where)] = losses.view(pairs, -1).mean(0)
    model.train()
    return out
