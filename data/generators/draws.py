"""Random draws shared by the log generators (`data/generators/logs.py`, `data/generators/clusters.py`)."""

from __future__ import annotations

import numpy as np


def power_law(rng: np.random.Generator, n: int, alpha: float, size: int) -> np.ndarray:
    """`[size]` ranks in [0, n) with P(rank k) ~ (k + 1) ** -alpha (inverse CDF of the continuous law)."""
    u = rng.random(size)
    if abs(alpha - 1.0) < 1e-9:
        x = np.exp(u * np.log(n + 1.0))
    else:
        x = (1.0 + u * ((n + 1.0) ** (1.0 - alpha) - 1.0)) ** (1.0 / (1.0 - alpha))
    return np.minimum(np.floor(x).astype(np.int64) - 1, n - 1)
