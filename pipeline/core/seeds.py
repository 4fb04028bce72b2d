"""Independent random streams from one seed: numpy's SeedSequence mixes the keys, so streams for
(seed, stream, index) never collide or overlap the way seed * 1000 + k can."""
from __future__ import annotations

import numpy as np

# stream ids: one per use, so that adding a use never shifts another's draws
PROXY, PROFILE, PROFILE_DRAWS, MIA_PAIR, DUPLICATES, AMBIENT, PRETRAIN = 1, 2, 3, 4, 5, 6, 7


def derived_seed(*keys: int) -> int:
    """A 32-bit seed for torch.Generator.manual_seed from integer keys."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1)[0])
