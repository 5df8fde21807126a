"""Distributed evaluation metrics: exact AUC, GAUC and NE with O(N / W) memory per rank.

Why: the exact path (`trainer/evaluation/metrics.py`) all-gathers every evaluation row onto every
rank and sorts the whole set there, O(N) memory and O(N log N) time per rank whatever the
world size. Here each rank keeps its own rows and receives about N / W entries; nothing
of size N is built anywhere.

What, per task:

- NE, row count, positive rate: each rank sums its log loss, labels and rows; the sums
  of all ranks are gathered and added in rank order, so every rank gets the same bits.
- AUC and GAUC: one engine, a distributed sort of (group, score) keys ("grouped AUC").
  The group is 0 for AUC and the user id for GAUC.
  1. Rows to entries: each rank sorts its rows by key and merges equal keys into one
     entry (group, score, #pos, #neg). Ties collapse here: a score repeated a million
     times is one entry per rank.
  2. Splitters: each rank contributes S regularly spaced keys of its sorted entries,
     each weighted by the number of entries it stands for; the W - 1 weighted quantiles
     of the W * S gathered keys cut the key space into W ordered ranges.
  3. All-to-all: every entry goes to the rank owning its key range (uneven
     `all_to_all_single`; split sizes are exchanged first). Equal keys go to the same
     rank, so ties are never split.
  4. Each rank merges what it received (equal keys from several ranks add up) and sums,
     per group, #pos * (2 * #neg scored lower in the group + #neg): twice the
     Mann-Whitney numerator, each (pos, neg) pair counting 1 when the negative is scored
     lower and 1/2 when the scores are equal (what average ranks give).
  5. A group cut by a range boundary (the AUC group always is; a user with many rows may
     be) lies on consecutive ranks. Every rank's first and last group sums are
     all-gathered (W rows of 9 ints); the rank holding a group's first part adds the
     later parts, shifting each part's numerator by its positives times the negatives of
     the parts before it, and owns the group.
  Counts and numerators are int64, so the AUC is exact: one rounding, at the final
  division. It equals the exact path's bit for bit while its rank sums stay below 2**53
  (N up to about 10**8 rows); int64 holds twice the numerator up to about 4 * 10**9
  rows. Per-user AUCs are exact the same way; the impression-weighted mean is a float64
  sum (agrees with the exact path to about 1e-15).

Why exact and not binned: torchmetrics' binned `BinaryAUROC(thresholds=K)` keeps O(K)
memory but its docs only call it "less accurate"; the error of any binning is bounded by
the pairs that fall in one bin, 1/2 * sum_b P_b N_b / (P N), which depends on the score
distribution (a well-calibrated CTR model puts most mass in a few bins of [0, 1]), so no
bound holds a priori. TorchRec's `AUCMetric` all-gathers its window and sorts it (O(N)
per rank, ties broken by sort order). The distributed sort costs O(N / W) memory and
O((N / W) log(N / W)) time per rank plus one all-to-all of at most ~N / W entries (28
bytes each with float32 logits), so exactness is free here.

Cost: a few numpy buffers per local row at peak (the test bounds the bytes per local
row), against a full copy of every global row per rank for the exact path; measured
figures are in `benchmarks/results/eval_scale/`. Sorting uses one uint64 key (user,
score bits) when the scores are float32 and the ids fit in 32 bits (the trainer's case),
else a two-key lexsort (slower).

Why range partitioning for GAUC rather than hash(user) % W: hashing puts all of a user's
rows on one rank, so a heavy user (or unlucky hashing) breaks the N / W bound; sorting by
(user, score) lets a user span ranks (step 5) and every rank receives at most about
M / W + 2 * (M / S + W) entries for M entries in all, M <= N, whatever the skew. With
S = min(64 * W, 4096) samples per rank that is within ~3% of M / W for W <= 64.

Transport: rows are CPU numpy arrays wrapped as CPU tensors; the `parallel.dist` helpers
carry them over the gloo host group when the main group is NCCL, so `group` must be
None (the world) there. Every rank must call these functions together (collectives).

Legend: N rows on this rank (padding dropped), M (group, score) entries, S samples per
rank, W ranks, G groups, K = W - 1 splitters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.distributed as dist

from parallel.dist import all_gather_cat, all_to_all_single, world_size

NE_EPS = 1e-7
OVERSAMPLE = 64
MAX_SAMPLES = 4096


@dataclass(slots=True)
class _Entries:
    """Distinct (group, score) keys sorted by group then score, with their counts."""

    g_M: np.ndarray  # int64 group (user id; 0 for plain AUC)
    s_M: np.ndarray  # score: float32 (the trainer's logits) or float64, one dtype on every rank
    pos_M: np.ndarray  # int64 positives with this key
    neg_M: np.ndarray  # int64 negatives with this key

    def __len__(self) -> int:
        return len(self.s_M)


def _rank(group: dist.ProcessGroup | None) -> int:
    return dist.get_rank(group) if dist.is_initialized() else 0


def rank_sum(x: np.ndarray, group: dist.ProcessGroup | None = None) -> np.ndarray:
    """Sum over ranks of the 1-D `x` (same length everywhere), added in rank order so
    that every rank gets the same bits."""
    t = torch.from_numpy(np.ascontiguousarray(x))[None]
    return all_gather_cat(t, group).numpy().sum(axis=0)


def _key_starts(g_M: np.ndarray, s_M: np.ndarray) -> np.ndarray:
    """Offsets of the runs of equal (group, score) in sorted keys."""
    new = s_M[1:] != s_M[:-1]
    new |= g_M[1:] != g_M[:-1]
    return np.flatnonzero(np.r_[True, new]) if len(s_M) else np.zeros(0, np.int64)


def _order(g_M: np.ndarray | None, s_M: np.ndarray, *, runs: bool = False) -> np.ndarray:
    """The permutation sorting rows by (group, score); None groups = one group.

    Fast path (the trainer's case): float32 scores and group ids in [0, 2**32) pack into
    one uint64 key (group high, score's order-preserving bits low), sorted by numpy's
    default (SIMD quicksort) or, with `runs` (input made of W sorted runs, as the
    all-to-all delivers), by timsort, which merges the runs in O(N log W). Else a
    two-key lexsort.
    """
    kind: Literal["stable"] | None = "stable" if runs else None
    if s_M.dtype == np.float32 and (g_M is None or len(g_M) == 0 or (g_M.min() >= 0 and g_M.max() < 2**32)):
        # -0.0 gets the key just below 0.0's: adjacent after sorting, merged by `_key_starts`
        bits = s_M.copy().view(np.uint32)
        negative = bits >= np.uint32(2**31)
        np.invert(bits, out=bits, where=negative)  # in place: no temporaries of N keys
        np.bitwise_or(bits, np.uint32(2**31), out=bits, where=~negative)
        del negative
        key = np.zeros(len(bits), np.uint64) if g_M is None else g_M.astype(np.uint64)
        key <<= np.uint64(32)
        key |= bits
        del bits
        return np.argsort(key, kind=kind)
    return np.argsort(s_M, kind=kind) if g_M is None else np.lexsort((s_M, g_M))


def _entries(groups_N: np.ndarray | None, scores_N: np.ndarray, labels_N: np.ndarray) -> _Entries:
    """Step 1: this rank's rows sorted by key, equal keys merged. Scores keep their
    dtype if float32 (exact: a float32 ties and orders as its float64 value)."""
    scores_N = np.asarray(scores_N)
    if scores_N.dtype != np.float32:
        scores_N = scores_N.astype(np.float64)
    groups_N = None if groups_N is None else np.asarray(groups_N, np.int64)
    order = _order(groups_N, scores_N)
    g = np.zeros(len(order), np.int64) if groups_N is None else groups_N[order]
    s = scores_N[order]
    pos = np.asarray(labels_N)[order] > 0.5
    del order
    starts = _key_starts(g, s)
    pos_M = np.add.reduceat(pos, starts, dtype=np.int64) if len(starts) else np.zeros(0, np.int64)
    neg_M = np.diff(np.r_[starts, len(s)]) - pos_M
    return _Entries(g[starts], s[starts], pos_M, neg_M)


def _merge(e: _Entries) -> _Entries:
    """Step 4, in place: sort received entries by key and merge equal keys (sent by
    several ranks). One column is copied at a time."""
    order = _order(e.g_M, e.s_M, runs=True)
    for name in ("g_M", "s_M", "pos_M", "neg_M"):
        setattr(e, name, getattr(e, name)[order])
    del order
    starts = _key_starts(e.g_M, e.s_M)
    if len(starts) < len(e):
        e.pos_M, e.neg_M = np.add.reduceat(e.pos_M, starts), np.add.reduceat(e.neg_M, starts)
        e.g_M, e.s_M = e.g_M[starts], e.s_M[starts]
    return e


def _splitters(e: _Entries, group: dist.ProcessGroup | None) -> np.ndarray | None:
    """Step 2: the W - 1 keys (int64 [K, 2]: group, score bits) that cut the global
    entries into W ranges of about equal size; None when no rank has an entry."""
    num_ranks, m = world_size(group), len(e)
    num_samples = min(OVERSAMPLE * num_ranks, MAX_SAMPLES)
    idx_S = (np.arange(num_samples) * m) // num_samples
    sample_S3 = np.zeros((num_samples, 3), np.int64)
    if m:
        sample_S3[:, 0] = e.g_M[idx_S]
        sample_S3[:, 1] = e.s_M[idx_S].astype(np.float64).view(np.int64)
    sample_S3[:, 2] = np.diff(np.r_[idx_S, m])  # entries each sample stands for
    every = all_gather_cat(torch.from_numpy(sample_S3), group).numpy()
    every = every[every[:, 2] > 0]
    if len(every) == 0:
        return None
    every = every[np.lexsort((np.ascontiguousarray(every[:, 1]).view(np.float64), every[:, 0]))]
    weight = every[:, 2]
    before = np.cumsum(weight) - weight
    targets = np.arange(1, num_ranks) * (weight.sum() / num_ranks)
    pick = np.minimum(np.searchsorted(before, targets, side="left"), len(every) - 1)
    return every[pick, :2]


def _cuts(e: _Entries, splitters_K2: np.ndarray) -> np.ndarray:
    """Entry offsets [W + 1] of the ranges: entries [cuts[r], cuts[r + 1]) go to rank r
    (keys below splitter r, at or above splitter r - 1)."""
    cuts = [0]
    for split_g, split_bits in splitters_K2:
        lo, hi = np.searchsorted(e.g_M, split_g, "left"), np.searchsorted(e.g_M, split_g, "right")
        split_s = np.int64(split_bits).view(np.float64).astype(e.s_M.dtype)  # exact: it is an entry's score
        cuts.append(int(lo + np.searchsorted(e.s_M[lo:hi], split_s, "left")))
    cuts.append(len(e))
    return np.asarray(cuts, np.int64)


def _exchange(e: _Entries, cuts: np.ndarray, group: dist.ProcessGroup | None) -> _Entries:
    """Step 3: uneven all-to-all of the entry ranges; returns what this rank received."""
    if world_size(group) == 1:
        return e
    send = torch.from_numpy(np.diff(cuts))
    recv = torch.empty_like(send)
    all_to_all_single(recv, send, group=group)
    num_recv, out_splits, in_splits = int(recv.sum()), recv.tolist(), send.tolist()
    columns = []
    for col in (e.g_M, e.s_M, e.pos_M, e.neg_M):
        out = np.empty(num_recv, col.dtype)  # numpy-owned, so tracemalloc sees it
        all_to_all_single(torch.from_numpy(out), torch.from_numpy(col), out_splits, in_splits, group=group)
        columns.append(out)
    return _Entries(*columns)


def _group_sums(e: _Entries) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per group of the sorted, merged entries: id, twice the numerator, #pos, #neg."""
    if len(e) == 0:
        return e.g_M, e.pos_M, e.pos_M, e.neg_M
    starts = np.flatnonzero(np.r_[True, e.g_M[1:] != e.g_M[:-1]])
    neg_below = np.cumsum(e.neg_M) - e.neg_M  # negatives scored lower on this rank ...
    neg_below -= np.repeat(neg_below[starts], np.diff(np.r_[starts, len(e)]))  # ... in the same group
    twice = e.pos_M * (2 * neg_below + e.neg_M)
    del neg_below
    num2, pos, neg = (np.add.reduceat(x, starts) for x in (twice, e.pos_M, e.neg_M))
    return e.g_M[starts], num2, pos, neg


def _stitch(
    gid_G: np.ndarray, num2_G: np.ndarray, pos_G: np.ndarray, neg_G: np.ndarray, group: dist.ProcessGroup | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Join the groups that span ranks; returns (twice numerator, #pos, #neg) of the
    groups this rank owns (those whose first part is here)."""
    num_groups, rank = len(gid_G), _rank(group)
    edge = np.zeros(9, np.int64)  # has groups, then (id, num2, pos, neg) of the first and the last
    if num_groups:
        edge[:] = [1, gid_G[0], num2_G[0], pos_G[0], neg_G[0], gid_G[-1], num2_G[-1], pos_G[-1], neg_G[-1]]
    table = all_gather_cat(torch.from_numpy(edge)[None], group).numpy()
    if not num_groups:
        return num2_G, pos_G, neg_G
    lower = [q for q in range(rank) if table[q, 0]]
    first_is_continued = bool(lower) and table[lower[-1], 5] == gid_G[0]
    num2_G, pos_G, neg_G = num2_G.copy(), pos_G.copy(), neg_G.copy()
    if not (first_is_continued and num_groups == 1):
        last, g = num_groups - 1, gid_G[-1]
        for q in range(rank + 1, len(table)):
            if not table[q, 0]:
                continue
            if table[q, 1] != g:
                break
            num2_G[last] += table[q, 2] + 2 * table[q, 3] * neg_G[last]
            pos_G[last] += table[q, 3]
            neg_G[last] += table[q, 4]
            if table[q, 5] != g:  # rank q holds later groups: g ends there
                break
    own = slice(1 if first_is_continued else 0, num_groups)
    return num2_G[own], pos_G[own], neg_G[own]


def grouped_pair_counts(
    groups_N: np.ndarray | None,
    scores_N: np.ndarray,
    labels_N: np.ndarray,
    *,
    group: dist.ProcessGroup | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distributed sort (module doc, steps 1-5) of this rank's rows by (group, score).

    Args:
        groups_N: group (user) of each row, or None for one group (plain AUC).
        scores_N: scores (logits); labels_N: labels (> 0.5 is positive).
        group: process group (None = the world).

    Returns:
        For the groups this rank owns (every group is owned by exactly one rank): twice
        the Mann-Whitney numerator, #pos and #neg, int64 `[G]` each.
    """
    e = _entries(groups_N, scores_N, labels_N)
    splitters_K2 = _splitters(e, group)
    if splitters_K2 is None:
        empty = np.zeros(0, np.int64)
        return empty, empty, empty
    if world_size(group) > 1:
        cuts = _cuts(e, splitters_K2)
        e = _exchange(e, cuts, group)  # the sent entries are freed here, before the merge
        e = _merge(e)
    return _stitch(*_group_sums(e), group)


def distributed_auc(
    scores_N: np.ndarray, labels_N: np.ndarray, *, group: dist.ProcessGroup | None = None
) -> float | None:
    """Exact ROC AUC over every rank's rows (ties count 1/2); None with one class."""
    owned = grouped_pair_counts(None, scores_N, labels_N, group=group)  # the one group is on one rank
    num2, pos, neg = (int(v) for v in rank_sum(np.array([x.sum() for x in owned]), group))
    if pos == 0 or neg == 0:
        return None
    return num2 / 2.0 / (pos * neg)


def distributed_gauc(
    scores_N: np.ndarray, labels_N: np.ndarray, users_N: np.ndarray, *, group: dist.ProcessGroup | None = None
) -> tuple[float | None, int]:
    """Impression-weighted mean of per-user AUC over every rank's rows, and the number
    of users that count (both classes); (None, 0) when no user has both classes."""
    num2, pos, neg = grouped_pair_counts(users_N, scores_N, labels_N, group=group)
    ok = (pos > 0) & (neg > 0)
    user_auc = num2[ok].astype(np.float64) / 2.0 / (pos[ok] * neg[ok]).astype(np.float64)
    weight = (pos[ok] + neg[ok]).astype(np.float64)
    weighted, total, num_users = rank_sum(np.array([(user_auc * weight).sum(), weight.sum(), ok.sum()]), group)
    if num_users == 0:
        return None, 0
    return float(weighted / total), int(num_users)


def ne_sums(logits_N: np.ndarray, labels_N: np.ndarray, chunk: int = 1 << 18) -> np.ndarray:
    """This rank's (sum of log loss, sum of labels, rows), float64 `[3]`; in chunks of
    `chunk` rows so that the float64 temporaries stay small."""
    out = np.zeros(3)
    for lo in range(0, len(logits_N), chunk):
        x = np.asarray(logits_N[lo : lo + chunk], dtype=np.float64)
        probs = np.clip(1.0 / (1.0 + np.exp(-x)), NE_EPS, 1 - NE_EPS)
        y = np.asarray(labels_N[lo : lo + chunk], dtype=np.float64)
        out += [-(y * np.log(probs) + (1 - y) * np.log(1 - probs)).sum(), y.sum(), len(y)]
    return out


def ne_from_sums(log_loss_sum: float, label_sum: float, num_rows: float) -> float | None:
    """Mean log loss over the entropy of the base rate; None when the rate is 0 or 1."""
    if num_rows == 0:
        return None
    rate = label_sum / num_rows
    if rate <= 0.0 or rate >= 1.0:
        return None
    base = -(rate * math.log(rate) + (1 - rate) * math.log(1 - rate))
    return float(log_loss_sum / num_rows / base)


def distributed_task_metrics(
    rows: dict[str, np.ndarray],
    tasks: tuple[str, ...],
    *,
    with_users: bool,
    group: dist.ProcessGroup | None = None,
) -> dict[str, dict[str, float | None]]:
    """task -> {auc, gauc, gauc_users, ne, num_rows, positive_rate} over every rank's rows.

    Args:
        rows: this rank's rows, padding dropped (`Predictions.local_rows()` keys).
        tasks: task names.
        with_users: whether any rank has user ids (the same on every rank); a rank
            without `user_id` must have no rows.
        group: process group (None = the world).
    """
    users = rows.get("user_id")
    if with_users and users is None:
        assert all(len(v) == 0 for v in rows.values()), "rows without user ids on a rank while others have them"
        users = np.zeros(0, np.int64)
    out: dict[str, dict[str, float | None]] = {}
    for t in tasks:
        logits, labels = rows[f"logit/{t}"], rows[f"label/{t}"]
        log_loss, label_sum, num_rows = rank_sum(ne_sums(logits, labels), group)
        gauc, gauc_users = (None, None) if users is None else distributed_gauc(logits, labels, users, group=group)
        out[t] = {
            "auc": distributed_auc(logits, labels, group=group),
            "gauc": gauc,
            "gauc_users": None if gauc_users is None else float(gauc_users),
            "ne": ne_from_sums(log_loss, label_sum, num_rows),
            "num_rows": float(num_rows),
            "positive_rate": float(label_sum / num_rows) if num_rows else None,
        }
    return out
