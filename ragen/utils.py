"""Small helpers shared by several modules."""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator


@contextlib.contextmanager
def scoped_environ(**values: str) -> Iterator[None]:
    """Set environment variables for the duration of the block, then restore what was there."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def mix_seed(*parts: int) -> int:
    """A seed in [0, 2^31 - 1) made from integers (numpy's SeedSequence hash): close inputs give unrelated seeds."""
    import numpy as np

    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0]) % (2 ** 31 - 1)
