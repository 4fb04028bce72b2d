"""What every mitigation is: a params group (pipeline/core/config.py) and hooks the training loop calls,
each doing nothing by default (in the spirit of improved-diffusion's loss-aware samplers: the
trainer never branches on which mitigation is on). A new mitigation is a subclass in its own
module, its config group, its params.yaml block and one registry line in
`pipeline/mitigation/__init__.py` (plus its group's name among the iet stage's params in dvc.yaml).
The registry entry says what it requires; a mitigation reaches those through `Context.others`."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch


@dataclass(frozen=True)
class Context:
    """What a mitigation learns about the run when it is built."""
    samples: int                 # training-set size; per-sample state is indexed by position
    proxies: tuple[int, ...]     # the proxies this process trains
    timesteps: int               # model.num_train_timesteps
    others: dict[str, "Mitigation"] = field(default_factory=dict)  # the mitigations it requires, built
    # where the training step runs: state the step reads or writes lives there, so that a step
    # never waits for the host (state() may return it there; load_state gets CPU tensors)
    device: torch.device = torch.device("cpu")
    batch_size: int = 1          # train.batch_size: samples of one optimizer step
    warmup_steps: int = 0        # of each proxy's LR schedule
    seed: int = 0                # for a mitigation's own fixed draws (seeds.train's AMBIENT stream)
    images: np.ndarray | None = None  # the training images (uint8, [N, ...]) by position


@dataclass(frozen=True)
class Step:
    """One optimizer step of proxy k, as the mitigations observe it after the backward pass."""
    positions: torch.Tensor  # training-set positions of the batch
    timesteps: torch.Tensor
    losses: torch.Tensor     # per-sample denoising loss (detached)
    keep: torch.Tensor       # which samples contributed to the gradient


@dataclass
class RoundEnd:
    """What the end of a round offers: the loss table (losses[i, k] of sample i under proxy k's
    end-of-round weights, NaN until scored; `score(positions)` fills rows on demand) and the
    round's skip rates. A mitigation may change `shard` and append to `moves`."""
    shard: np.ndarray
    skip_rate: np.ndarray
    losses: np.ndarray
    score: Callable[[np.ndarray], np.ndarray]
    groups: np.ndarray | None = None  # near-duplicate group of each position with iet.split: groups (they move whole)
    moves: list[dict] = field(default_factory=list)
    round: int = 0                    # which round ended (0-based)


class Mitigation:
    """Its name, label and requirements are its registry entry's."""
    # Whether a drawn batch's kept samples give the step's gradient. False (the authors' TAA queue): a
    # draw is a forward pass without gradient that only feeds keep() and observe(); the proxy takes
    # its optimizer steps on the batches `queued` hands out instead.
    trains_draws: bool = True

    def __init__(self, cfg, ctx: Context):
        self.cfg, self.ctx = cfg, ctx

    def attach(self, k: int, proxy) -> None:
        """Once, when proxy k (a pipeline.train.training.Proxy) is built, before it trains or resumes. A
        mitigation that changes how a step turns the backward pass into an update (DP-SGD) wraps
        the proxy's optimizer here and may hook its model; the loop then steps as always."""

    def members(self, k: int, positions: torch.Tensor) -> torch.Tensor:
        """The training-set positions proxy k draws its batches from in a round, of its shard's
        `positions`; the round's optimizer steps do not change."""
        return positions

    def transform(self, k: int, x0: torch.Tensor, positions: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The batch proxy k trains on, from the clean images x0 (before noise is added)."""
        return x0

    def noised(self, k: int, x0: torch.Tensor, positions: torch.Tensor, timesteps: torch.Tensor, noise: torch.Tensor,
               schedule) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The training objective: the noisy input x_t and the target the model's prediction is
        regressed on, per-sample loss mean((pred - target)^2). None: the plain DDPM objective,
        x_t = schedule.add_noise(x0, noise, t) and target noise. At most one active mitigation
        may change it."""
        return None

    def keep(self, k: int, losses: torch.Tensor, timesteps: torch.Tensor, positions: torch.Tensor) -> torch.Tensor | None:
        """Which samples (at training-set `positions`) may contribute to the gradient; None: all."""
        return None

    def observe(self, k: int, step: Step) -> None:
        """After proxy k's backward pass."""

    def queued(self, k: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor] | None:
        """After observe(), where trains_draws is False: (positions, clean images in [-1, 1]) of a
        batch proxy k takes one optimizer step on now (plain mean loss), or None."""
        return None

    def weights(self, sizes: list[int]) -> list[float]:
        """The proxies' weights in IET's mean, from their shard sizes (IET: the sizes themselves)."""
        return sizes

    def averages(self, rnd: int, rounds: int) -> bool:
        """Whether the mean is loaded back into every proxy after round `rnd` (0-based) of `rounds`;
        when not, each proxy goes on from its own weights (the mean is still saved, for evaluation).
        The last round must average: the model written is the mean."""
        return True

    def end_round(self, end: RoundEnd) -> None:
        """After every proxy trained the round, before the average is loaded back."""

    def sync(self, ranks, owned: torch.Tensor) -> None:
        """Combine state over processes at the end of a round (`owned`: positions this process's
        proxies drew from). Every process calls it; collectives only."""

    def state(self, k: int | None) -> dict[str, torch.Tensor]:
        """Tensors to checkpoint: proxy k's own (k given) or the per-sample state (k None)."""
        return {}

    def load_state(self, tensors: dict[str, torch.Tensor], k: int | None) -> None:
        """Inverse of state()."""

    def curve(self, k: int) -> dict[str, float]:
        """Extra values of proxy k's training curve points."""
        return {}

    def round_metrics(self) -> dict[str, float]:
        """Values logged once per round (after sync)."""
        return {}

    def summary(self) -> dict[str, float]:
        """Values of the whole run, at its end: train_info.json and the training run's MLflow metrics."""
        return {}
