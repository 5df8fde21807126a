"""AUC, DeLong and the paired bootstrap engine behind `benchmarks/paired.py` (numpy only).

- `auc(scores, labels, weights)`: weighted AUC with midranks, O(N log N); equals
  `trainer.evaluation.metrics.auc` on unweighted input (bit for bit: both sum exact half-integers).
- `delong(scores_KN, labels_N)`: AUCs and covariance of K classifiers on the same rows,
  the fast midrank algorithm of Sun & Xu (2014), O(K N log N).
- `RankedScores`: one (run, task) score vector sorted once; `weighted_aucs(W_RN)` then
  gives R replicates' AUCs in O(R N) without sorting again: with the negatives in score
  order and the cumulative weight C of negatives, a positive whose score has `lo`
  negatives strictly below it and `hi` at or below it beats weight (C[lo] + C[hi]) / 2
  of negatives, ties counted half. Integer weights, so the sums are exact.
- `poisson1(rng, shape)`: Poisson(1) counts as uint8 by inverse CDF on 32-bit uniforms
  (about 6x faster than `Generator.poisson`; exact to 2^-32, P(count > 12) ~ 1e-10 is
  folded into 12).
- `bootstrap(ranked, n_rows, n_users, n_boot, rng)`: the replicate AUCs and GAUCs of any
  number of `RankedScores` under shared weights, in chunks of about 8M row weights.

Legend: N rows, U users, K classifiers, R replicates.
"""

from __future__ import annotations

import math

import numpy as np

CHUNK_ELEMENTS = 1 << 23  # row weights per bootstrap chunk (uint8: 8 MB, ~100 MB of temporaries)
MAX_POISSON = 12
_POISSON_CDF = np.cumsum([math.exp(-1.0) / math.factorial(k) for k in range(MAX_POISSON)])
_POISSON_THRESHOLDS = np.minimum(np.round(_POISSON_CDF * 2.0**32), 2.0**32 - 1).astype(np.uint32)

# ----------------------------------------------------------------------------- AUC, DeLong


def _midranks(x_N: np.ndarray) -> np.ndarray:
    """1-based ranks of `x_N`, ties sharing their average rank (Sun & Xu's midranks)."""
    order = np.argsort(x_N, kind="mergesort")
    sorted_x = x_N[order]
    starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])
    ends = np.r_[starts[1:], len(x_N)]
    ranks = np.empty(len(x_N), dtype=np.float64)
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    return ranks


def auc(scores: np.ndarray, labels: np.ndarray, weights: np.ndarray | None = None) -> float:
    """ROC AUC: P(score of a positive > score of a negative), ties counted half.

    Args:
        scores: `[N]` scores (any monotone transform gives the same AUC).
        labels: `[N]`, positive where > 0.5 (as `trainer.evaluation.metrics`).
        weights: `[N]` non-negative row weights (a row of weight w counts as w copies);
            None = all 1.

    Returns:
        The AUC; NaN when the positives or the negatives weigh nothing.
    """
    s = np.asarray(scores, dtype=np.float64)
    pos = np.asarray(labels) > 0.5
    w = np.ones(len(s)) if weights is None else np.asarray(weights, dtype=np.float64)
    if not (len(s) == len(pos) == len(w)):
        raise ValueError(f"scores, labels and weights differ in length: {len(s)}, {len(pos)}, {len(w)}")
    if (w < 0).any():
        raise ValueError("weights must be non-negative")
    order = np.argsort(s, kind="mergesort")
    sorted_s = s[order]
    group = np.cumsum(np.r_[True, sorted_s[1:] != sorted_s[:-1]]) - 1  # tie group of each sorted row
    w_sorted, pos_sorted = w[order], pos[order]
    wp = np.bincount(group, weights=w_sorted * pos_sorted)  # positive weight per tie group
    wn = np.bincount(group, weights=w_sorted * ~pos_sorted)
    total_p, total_n = wp.sum(), wn.sum()
    if total_p <= 0 or total_n <= 0:
        return math.nan
    below = np.cumsum(wn) - wn  # negative weight strictly below each group
    return float(np.sum(wp * (below + 0.5 * wn)) / (total_p * total_n))


def delong(scores_KN: np.ndarray, labels_N: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """AUCs of K classifiers on the same rows and their DeLong covariance (Sun & Xu 2014).

    With m positives X and n negatives Y, the structural components of classifier k are
    V10_k(X_i) = (Tz_i - Tx_i) / n (the share of negatives below positive i, ties half)
    and V01_k(Y_j) = 1 - (Tz_j - Ty_j) / m, where Tz, Tx, Ty are the midranks among all
    rows, the positives and the negatives; AUC_k = mean V10_k and
    cov = S10 / m + S01 / n with S10, S01 the sample covariances of the components.

    Args:
        scores_KN: `[K, N]` (or `[N]`) scores.
        labels_N: `[N]`, positive where > 0.5.

    Returns:
        aucs `[K]` and cov `[K, K]`.
    """
    scores = np.atleast_2d(np.asarray(scores_KN, dtype=np.float64))
    pos = np.asarray(labels_N) > 0.5
    m, n = int(pos.sum()), int((~pos).sum())
    if scores.shape[1] != len(pos):
        raise ValueError(f"scores have {scores.shape[1]} rows, labels {len(pos)}")
    if m < 2 or n < 2:
        raise ValueError(f"DeLong needs at least 2 positives and 2 negatives (got {m}, {n})")
    K = scores.shape[0]
    v10_KM, v01_KN = np.empty((K, m)), np.empty((K, n))
    for k in range(K):
        tz = _midranks(scores[k])
        v10_KM[k] = (tz[pos] - _midranks(scores[k, pos])) / n
        v01_KN[k] = 1.0 - (tz[~pos] - _midranks(scores[k, ~pos])) / m
    aucs = v10_KM.mean(axis=1)
    cov = np.atleast_2d(np.cov(v10_KM)) / m + np.atleast_2d(np.cov(v01_KN)) / n
    return aucs, cov


# ----------------------------------------------------------------------------- bootstrap engine


def poisson1(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Poisson(1) counts as uint8: the number of CDF thresholds a uniform uint32 passes."""
    u = rng.integers(0, 2**32, size=shape, dtype=np.uint32)
    out = np.zeros(shape, dtype=np.uint8)
    passed = np.empty(shape, dtype=bool)
    for threshold in _POISSON_THRESHOLDS:
        np.greater_equal(u, threshold, out=passed)
        out += passed
    return out


class RankedScores:
    """One score vector (a run's task) sorted once, for AUC under many row weightings.

    Attributes:
        n_pos, n_neg: class counts.
        auc: the AUC (NaN with one class), equal to `trainer.evaluation.metrics.auc`.
        gauc, gauc_users: GAUC as `trainer.evaluation.metrics.gauc_and_users` (NaN, 0 without users).
        user_num_U, user_den_U: per user `impressions x AUC` and `impressions`, both 0
            for users with one class: GAUC = sum(num) / sum(den) and, under user weights
            v, sum(v num) / sum(v den).
        placements_N: the DeLong structural components of every row, V10 for positives,
            V01 for negatives (NaN with one class); a caller may drop them (None).
    """

    def __init__(
        self,
        scores_N: np.ndarray,
        labels_N: np.ndarray,
        user_codes_N: np.ndarray | None = None,
        num_users: int = 0,
    ) -> None:
        """Sort the scores; `user_codes_N` are compact user indices in [0, num_users)."""
        pos = np.asarray(labels_N) > 0.5
        group_N = self._rank(np.asarray(scores_N, dtype=np.float64), pos)
        self.gauc, self.gauc_users = math.nan, 0
        self.user_num_U = self.user_den_U = np.zeros(0)
        if user_codes_N is not None:
            self._rank_users(np.asarray(user_codes_N, dtype=np.int64), num_users, group_N, pos)

    def _rank(self, s: np.ndarray, pos: np.ndarray) -> np.ndarray:
        """Sort; class counts, AUC, the engine's indices and the placements. Returns the
        score rank (tie group, ranks without gaps) of every row."""
        N = len(s)
        order = np.argsort(s)
        sorted_s = s[order]
        new_tie = np.r_[True, sorted_s[1:] != sorted_s[:-1]]
        starts = np.flatnonzero(new_tie)
        ends = np.r_[starts[1:], N]
        group_sorted = np.cumsum(new_tie) - 1
        pos_sorted = pos[order]
        # negatives (positives) strictly below / at or below each tie group
        neg_le = np.cumsum(~pos_sorted)
        pos_le = np.cumsum(pos_sorted)
        neg_lt = neg_le[starts] - (~pos_sorted[starts])  # count before the group's first row
        pos_lt = pos_le[starts] - pos_sorted[starts]
        neg_le, pos_le = neg_le[ends - 1], pos_le[ends - 1]
        self.n_pos = int(pos_le[-1]) if N else 0
        self.n_neg = N - self.n_pos
        g_pos = group_sorted[pos_sorted]
        self.neg_order = order[~pos_sorted]  # negatives in score order
        self.pos_index = order[pos_sorted]
        self.lo, self.hi = neg_lt[g_pos], neg_le[g_pos]
        self.ties = bool((self.lo != self.hi).any())
        two_pn = 2.0 * self.n_pos * self.n_neg
        self.auc = float((self.lo.sum() + self.hi.sum()) / two_pn) if two_pn else math.nan
        self.placements_N: np.ndarray | None = np.full(N, math.nan)
        if two_pn:
            self.placements_N[self.pos_index] = (self.lo + self.hi) / (2.0 * self.n_neg)
            g_neg = group_sorted[~pos_sorted]
            self.placements_N[self.neg_order] = 1.0 - (pos_lt[g_neg] + pos_le[g_neg]) / (2.0 * self.n_pos)
        group_N = np.empty(N, dtype=np.int64)
        group_N[order] = group_sorted
        return group_N

    def _rank_users(self, users: np.ndarray, num_users: int, group_N: np.ndarray, pos_N: np.ndarray) -> None:
        """Per-user AUCs: one sort by (user, score rank), then counts within users."""
        key = users * (int(group_N.max()) + 1) + group_N
        order = np.argsort(key)
        k, u, pos = key[order], users[order], pos_N[order]
        neg = ~pos
        new_user = np.r_[True, u[1:] != u[:-1]]
        new_tie = np.r_[True, k[1:] != k[:-1]]
        tie_id = np.cumsum(new_tie) - 1
        starts = np.flatnonzero(new_tie)
        ends = np.r_[starts[1:], len(k)]
        neg_le = np.cumsum(neg)
        user_base = (neg_le - neg)[np.flatnonzero(new_user)]  # negatives before each user's first row
        base = np.repeat(user_base, np.diff(np.r_[np.flatnonzero(new_user), len(k)]))
        lo = (neg_le - neg)[starts][tie_id] - base
        hi = neg_le[ends - 1][tie_id] - base
        n = np.bincount(u, minlength=num_users).astype(np.float64)
        n_pos = np.bincount(u, weights=pos, minlength=num_users)
        twice_wins = np.bincount(u, weights=(lo + hi) * pos, minlength=num_users)
        ok = (n_pos > 0) & (n_pos < n)
        user_auc = np.zeros(num_users)
        user_auc[ok] = twice_wins[ok] / (2.0 * n_pos[ok] * (n[ok] - n_pos[ok]))
        self.user_den_U = np.where(ok, n, 0.0)
        self.user_num_U = self.user_den_U * user_auc
        self.gauc_users = int(ok.sum())
        self.gauc = float(self.user_num_U.sum() / self.user_den_U.sum()) if self.gauc_users else math.nan

    def weighted_aucs(self, W_RN: np.ndarray) -> np.ndarray:
        """`[R]` AUCs under R integer row weightings `W_RN` (e.g. bootstrap counts), O(R N).

        Equals `auc(scores, labels, W_RN[r])` for every r (NaN where a class weighs 0).
        """
        if W_RN.dtype.kind not in "biu":
            raise TypeError(f"weights must be integers (got {W_RN.dtype})")
        R = W_RN.shape[0]
        if self.n_pos == 0 or self.n_neg == 0:
            return np.full(R, math.nan)
        if W_RN.dtype.kind == "i" and W_RN.size and W_RN.min() < 0:
            raise ValueError("weights must be non-negative")
        max_w = int(W_RN.max()) if W_RN.size else 0
        # counts in int32 while D = C[lo] + C[hi] <= 2 x the negatives' weight fits in it
        acc = np.int32 if 2 * max_w * self.n_neg < 2**31 else np.int64
        wn_RM = np.take(W_RN, self.neg_order, axis=1)
        C = np.empty((R, self.n_neg + 1), dtype=acc)  # C[:, j] = weight of the first j negatives
        C[:, 0] = 0
        np.cumsum(wn_RM, axis=1, dtype=acc, out=C[:, 1:])
        D = np.take(C, self.lo, axis=1)
        if self.ties:
            D += np.take(C, self.hi, axis=1)
        else:
            D *= 2
        wp_RP = np.take(W_RN, self.pos_index, axis=1)
        twice_wins = np.einsum("rp,rp->r", wp_RP, D, dtype=np.int64)
        den = 2.0 * wp_RP.sum(axis=1, dtype=np.int64) * C[:, -1].astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(den > 0, twice_wins / den, math.nan)


def bootstrap(
    ranked: list[RankedScores], n_rows: int, n_users: int, n_boot: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray | None]:
    """Replicate AUCs `[K, n_boot]` (Poisson row weights) and GAUCs `[K, n_boot]` (Poisson
    user weights; None when `n_users` is 0), every replicate weighting all K alike."""
    row_rng, user_rng = rng.spawn(2)
    K = len(ranked)
    aucs = np.empty((K, n_boot))
    step = max(1, CHUNK_ELEMENTS // max(n_rows, 1))
    for r0 in range(0, n_boot, step):
        W = poisson1(row_rng, (min(step, n_boot - r0), n_rows))
        for k, rs in enumerate(ranked):
            aucs[k, r0 : r0 + len(W)] = rs.weighted_aucs(W)
    if not n_users:
        return aucs, None
    num_UK = np.stack([rs.user_num_U for rs in ranked], axis=1)
    den_UK = np.stack([rs.user_den_U for rs in ranked], axis=1)
    gaucs = np.empty((K, n_boot))
    step = max(1, CHUNK_ELEMENTS // n_users)
    for r0 in range(0, n_boot, step):
        V = poisson1(user_rng, (min(step, n_boot - r0), n_users)).astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            gaucs[:, r0 : r0 + len(V)] = ((V @ num_UK) / (V @ den_UK)).T
    return aucs, gaucs


# ----------------------------------------------------------------------------- inputs
