"""De-duplication, the remedy everyone accepts (Carlini et al. 2023, "Extracting Training Data from
Diffusion Models"; Somepalli et al. 2023, "Understanding and Mitigating Copying in Diffusion
Models"): each group of duplicated training images is trained on once, through its first position;
the optimizer steps stay those of the run (Plan), so the model sees the remaining images more
often. Exact duplicates, and near duplicates below `dedup.near_duplicate` (pipeline/core/dedup.py's
groups) when it is above 0. The known remedy the frontier protocol must be able to find better
(docs/method.md#references)."""
from __future__ import annotations

import torch

from pipeline.core.dedup import near_duplicate_groups
from pipeline.mitigation.base import Mitigation


class Dedup(Mitigation):
    """Keeps the first position of every duplicate group in the batches' pool; no state."""

    def __init__(self, cfg, ctx):
        super().__init__(cfg, ctx)
        groups = near_duplicate_groups(ctx.images, cfg.near_duplicate)
        first = torch.zeros(ctx.samples, dtype=torch.bool)
        first[torch.from_numpy(groups.representatives)] = True
        self.first = first.to(ctx.device)
        self.removed = int(ctx.samples - len(groups.representatives))

    def members(self, k, positions):
        return positions[self.first[positions]]

    def summary(self):
        return {"dedup_removed": self.removed}
