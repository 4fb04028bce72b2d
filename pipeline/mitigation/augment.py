"""The plain augmentation baseline: every drawn sample is augmented with TAA's transforms at one
fixed strength, nothing is skipped. The cheap mitigation a user tries first, and the control that
tells whether TAA's loss-driven strengths add anything over augmenting everything."""
from __future__ import annotations

import torch

from pipeline.mitigation.base import Mitigation
from pipeline.mitigation.taa import augment


class Augment(Mitigation):
    """Fixed strength for every sample: no state, no use of the loss."""

    def transform(self, k, x0, positions, generator):
        return augment(x0, torch.full((len(positions),), self.cfg.strength), self.cfg, generator)
