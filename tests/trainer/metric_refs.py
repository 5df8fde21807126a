"""Brute-force metric definitions that share no code with `trainer/evaluation/metrics.py`.

AUC counts every (positive, negative) pair, ties 1/2; GAUC loops over users. Kept apart
from the test modules so that spawned ranks import them without torchrec or Hydra.
"""

from __future__ import annotations

import numpy as np


def brute_auc(s: np.ndarray, y: np.ndarray) -> float:
    p, n = s[y > 0.5], s[y <= 0.5]
    wins = (p[:, None] > n[None]).sum() + 0.5 * (p[:, None] == n[None]).sum()
    return float(wins / (len(p) * len(n)))


def brute_gauc(s: np.ndarray, y: np.ndarray, users: np.ndarray) -> tuple[float | None, int]:
    """Impression-weighted mean of brute-force per-user AUCs, and how many users count."""
    vals, weights = [], []
    for u in np.unique(users):
        m = users == u
        if 0 < (y[m] > 0.5).sum() < m.sum():
            vals.append(brute_auc(s[m], y[m]))
            weights.append(m.sum())
    return (float(np.average(vals, weights=weights)) if vals else None), len(vals)
