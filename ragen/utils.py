"""Small helpers shared by several modules."""
from __future__ import annotations


def mix_seed(*parts: int) -> int:
    """A seed in [0, 2^31 - 1) made from integers (numpy's SeedSequence hash): close inputs give unrelated seeds."""
    import numpy as np

    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0]) % (2 ** 31 - 1)
