"""Independent, reproducible random streams keyed by several integers."""

from __future__ import annotations

import numpy as np
import torch


def keyed_generator(*keys: int) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded from ``keys`` (e.g. ``(seed, step, rank)``).

    The keys are mixed by ``numpy.random.SeedSequence`` into the 32 bits torch uses, so nearby
    key tuples give unrelated streams and a stream does not depend on which others were drawn.
    """
    state = np.random.SeedSequence([int(k) for k in keys]).generate_state(1)[0]
    return torch.Generator().manual_seed(int(state))
